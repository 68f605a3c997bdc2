"""MT-Bench judging over real HTTP: a judge endpoint served by the test (stdlib ThreadingHTTPServer)
answers with canned replies in OpenAI's real chat-completion and error shapes: ratings in both
FastChat forms, an unparsable reply, 429 and 500 before success, a 400 that must not be retried,
a reply slower than the timeout. Checked: FastChat's prompt filling and parse, the retries, the
concurrency bound, the resume (a re-run sends nothing for what is recorded; a cut-off last line is
repaired), the per-turn and per-category means, and a judgment file with FastChat's fields that
show_result.py's pandas reading agrees with.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from helpsteer_core.config import ConfigError, load_config
from helpsteer_core.mt_bench import (
    RECORD_FIELDS,
    fill_prompt,
    parse_rating,
    per_category,
    read_answers,
    read_judge_prompts,
    read_questions,
)
from ray_jobs.judge import JudgeConfig, JudgeEndpoint, judge, main

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench"
QUESTIONS, PROMPTS, REFERENCES = (
    MT_BENCH / "question.jsonl",
    MT_BENCH / "judge_prompts.jsonl",
    MT_BENCH / "reference_answer_gpt-4.jsonl",
)
KEY_ENV, KEY = "HELPSTEER_TEST_JUDGE_KEY", "sk-test-judge-key"
TIMEOUT_S = 5.0  # generous: on a loaded machine a tight timeout would also cut normal replies
ASKED = (81, 101, 111)  # writing (no reference), reasoning and math (GPT-4's reference answers)

pytestmark = pytest.mark.skipif(not QUESTIONS.is_file(), reason=f"{MT_BENCH} is absent (../shared/data)")


# --- FastChat's rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("The response is accurate and well organised.\n\nRating: [[8]]", 8),
        ("Mostly right, one slip in step 2. Rating: [[7.5]]", 7.5),
        ("The answer is wrong: the reference says 2 [1], so [[3]] is fair.", 3),  # [[N]] wins over [N]
        ("The assistant's answer matches the reference.\n\nRating: [6]", 6),  # the backup form
        ('Rating: "[[10]]"', 10),
        ("Rating: [[5.]]", 5.0),
        ("I cannot evaluate this response. Rating: [[rating]]", -1),
        ("Rating: 8/10", -1),
        ("", -1),
    ],
)
def test_rating_parse_follows_fastchat(reply: str, score: float) -> None:
    parsed = parse_rating(reply)
    assert parsed == score and type(parsed) is type(score)


def test_prompts_are_filled_as_fastchat_fills_them() -> None:
    prompts = read_judge_prompts(PROMPTS)
    questions = {q["question_id"]: q for q in read_questions(QUESTIONS)}
    reference = read_answers(REFERENCES)[101]
    q81, q101 = questions[81]["turns"], questions[101]["turns"]
    single = fill_prompt(prompts["single-v1"]["prompt_template"], q81, ["A {brace} answer."], None, False)
    assert single.startswith("[Instruction]\nPlease act as an impartial judge")
    assert single.endswith(
        f"[Question]\n{q81[0]}\n\n[The Start of Assistant's Answer]\nA {{brace}} answer.\n"
        "[The End of Assistant's Answer]"
    )
    math = fill_prompt(prompts["single-math-v1"]["prompt_template"], q101, ["Second."], reference, False)
    assert f"[The Start of Reference Answer]\n{reference[0]}\n[The End of Reference Answer]" in math
    multi = fill_prompt(
        prompts["single-math-v1-multi-turn"]["prompt_template"], q101, ["One.", "Two."], reference, True
    )
    assert multi.startswith(
        f"<|The Start of Reference Answer|>\n\n### User:\n{q101[0]}\n\n"
        f"### Reference answer:\n{reference[0]}\n\n### User:\n{q101[1]}\n\n"
        f"### Reference answer:\n{reference[1]}\n\n<|The End of Reference Answer|>"
    )
    assert multi.endswith(
        f"### User:\n{q101[0]}\n\n### Assistant A:\nOne.\n\n### User:\n{q101[1]}\n\n### Assistant A:\nTwo."
        "\n\n<|The End of Assistant A's Conversation with User|>"
    )


def test_a_per_category_subset_keeps_every_category_and_every_grading() -> None:
    questions = read_questions(QUESTIONS)
    one = per_category(questions, 1)
    assert [q["question_id"] for q in one] == [81, 91, 101, 111, 121, 131, 141, 151]
    assert len({q["category"] for q in one}) == len({q["category"] for q in questions}) == 8
    # Math, reasoning and coding are graded against GPT-4's references: all three are in the subset.
    referenced = set(read_answers(REFERENCES))
    assert {q["category"] for q in one if q["question_id"] in referenced} == {"math", "reasoning", "coding"}
    assert [q["question_id"] for q in per_category(questions, 2)][:4] == [81, 82, 91, 92]
    assert per_category(questions, None) == questions


# --- a judge endpoint with canned replies ---------------------------------------------------------


def completion(content: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A 200 in the shape OpenAI's API returns for gpt-4."""
    body = {
        "id": "chatcmpl-8VhT5YkxB3mWLtqGn0sT1XeJp2Kq",
        "object": "chat.completion",
        "created": 1702468903,
        "model": "gpt-4-0613",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 512, "completion_tokens": 96, "total_tokens": 608},
        "system_fingerprint": None,
    }
    return 200, body, {}


def api_error(status: int, message: str, kind: str, code: str | None, **headers: str):
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers


RATE_LIMITED = api_error(
    429,
    "Rate limit reached for gpt-4 in organization org-abc on tokens per min (TPM): Limit 10000, "
    "Used 9850, Requested 700. Please try again in 3.3s.",
    "tokens",
    "rate_limit_exceeded",
    **{"retry-after": "0"},
)
SERVER_ERROR = api_error(
    500, "The server had an error while processing your request. Sorry about that!", "server_error", None
)
OVERLOADED = api_error(
    503, "The engine is currently overloaded, please try again later", "server_error", None
)
TOO_LONG = api_error(
    400,
    "This model's maximum context length is 8192 tokens. However, your messages resulted in 9001 tokens.",
    "invalid_request_error",
    "context_length_exceeded",
)
SLOW = (-1, {}, {})  # sleeps past the client's timeout, then answers


@dataclass
class Judge:
    """The canned endpoint: `script[(model, question_id, turn)]` is the list of replies to give in
    turn (the last repeats); anything unscripted rates 5."""

    url: str
    script: dict[tuple[str, int, int], list[Any]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def asked(self, key: tuple[str, int, int]) -> int:
        return sum(r["key"] == key for r in self.requests)


def _key(user_prompt: str) -> tuple[str, int, int]:
    """The answer the prompt judges: its answers carry markers `<model>:<question>:<turn>`."""
    model, qid, turn = max(re.findall(r"ANSWER-(\w+):(\d+):(\d)", user_prompt), key=lambda m: m[2])
    return model, int(qid), int(turn)


@pytest.fixture()
def endpoint() -> Iterator[Judge]:
    state = Judge("")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            key = _key(body["messages"][1]["content"])
            with state.lock:
                state.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body, "key": key}
                )
                state.in_flight += 1
                state.most_in_flight = max(state.most_in_flight, state.in_flight)
                replies = state.script.get(key) or [completion("A fair answer overall. Rating: [[5]]")]
                status, reply, headers = replies.pop(0) if len(replies) > 1 else replies[0]
            time.sleep(0.05)  # long enough for requests to overlap
            with state.lock:  # before replying: the client's next request may come at once
                state.in_flight -= 1
            try:
                if status == -1:
                    time.sleep(TIMEOUT_S + 2)
                    return
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up on a slow reply

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.block_on_close = True, False  # the slow reply nobody reads: not awaited
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def write_answers(folder: Path, models: tuple[str, ...] = ("alpha", "beta")) -> Path:
    """FastChat answer files as evaluate writes them, for the ASKED questions."""
    (folder / "model_answer").mkdir(parents=True)
    for model in models:
        lines = [
            json.dumps(
                {
                    "question_id": qid,
                    "answer_id": f"{model}{qid}",
                    "model_id": model,
                    "choices": [{"index": 0, "turns": [f"ANSWER-{model}:{qid}:{t}" for t in (1, 2)]}],
                    "tstamp": 1.0,
                }
            )
            for qid in ASKED
        ]
        (folder / "model_answer" / f"{model}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def settings(url: str, **extra: Any) -> JudgeEndpoint:
    values = {
        "base_url": url,
        "model": "gpt-4",
        "api_key_env": KEY_ENV,
        "concurrency": 3,
        "retries": 2,
        "backoff_s": 0.01,
        "timeout_s": TIMEOUT_S,
        "judge_prompts": str(PROMPTS),
        "references": str(REFERENCES),
    }
    return JudgeEndpoint.model_validate(values | extra)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_judging_parses_retries_bounds_and_resumes_over_http(
    endpoint: Judge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    endpoint.script = {
        ("alpha", 81, 1): [
            RATE_LIMITED,
            SERVER_ERROR,
            completion("Vivid and well structured. Rating: [[8]]"),
        ],
        ("alpha", 81, 2): [completion("The rewrite keeps the content. Rating: [[6]]")],
        ("alpha", 101, 1): [
            completion("The assistant's answer matches the reference answer.\n\nRating: [7]")
        ],
        ("alpha", 101, 2): [completion("I'm sorry, but I can't provide a rating for this conversation.")],
        ("alpha", 111, 1): [completion("Correct area with a small slip in the steps. Rating: [[9.5]]")],
        ("alpha", 111, 2): [completion("The circle's area is wrong. Rating: [[3]]")],
        ("beta", 81, 1): [SLOW, completion("Rating: [[4]]")],
        ("beta", 101, 1): [TOO_LONG],
        ("beta", 111, 2): [OVERLOADED],
    }
    folder = write_answers(tmp_path / "mt_bench")
    result = judge(folder, QUESTIONS, settings(endpoint.url))

    out = folder / "model_judgment" / "gpt-4_single.jsonl"
    assert result["judgment_file"] == str(out)
    assert (result["asked"], result["already"], result["failed"]) == (12, 0, 2)
    # Retried: 429 then 500 then success; the slow reply after its timeout; the 503 three times
    # (retries=2); the 400 once. Everything else once.
    assert endpoint.asked(("alpha", 81, 1)) == 3 and endpoint.asked(("beta", 81, 1)) == 2
    assert endpoint.asked(("beta", 111, 2)) == 3 and endpoint.asked(("beta", 101, 1)) == 1
    assert len(endpoint.requests) == 12 - 4 + 3 + 2 + 3 + 1
    assert 1 < endpoint.most_in_flight <= 3
    first = endpoint.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {KEY}"
    assert {k: v for k, v in first["body"].items() if k != "messages"} == {
        "model": "gpt-4",
        "n": 1,
        "temperature": 0.0,
        "max_tokens": 2048,
    }
    assert [m["role"] for m in first["body"]["messages"]] == ["system", "user"]

    written = records(out)
    assert all(tuple(r) == RECORD_FIELDS for r in written)  # FastChat's fields, in its order
    got = {(r["model"], r["question_id"], r["turn"]): r for r in written}
    assert set(got) == {(m, q, t) for m in ("alpha", "beta") for q in ASKED for t in (1, 2)} - {
        ("beta", 101, 1),
        ("beta", 111, 2),
    }
    assert {k: got[k]["score"] for k in got if k[0] == "alpha"} == {
        ("alpha", 81, 1): 8,
        ("alpha", 81, 2): 6,
        ("alpha", 101, 1): 7,
        ("alpha", 101, 2): -1,
        ("alpha", 111, 1): 9.5,
        ("alpha", 111, 2): 3,
    }
    assert got[("alpha", 101, 2)]["judgment"].startswith("I'm sorry")  # the unparsable reply is kept
    assert got[("alpha", 81, 1)]["judge"] == ["gpt-4", "single-v1"]
    assert got[("alpha", 81, 2)]["judge"] == ["gpt-4", "single-v1-multi-turn"]
    assert got[("alpha", 101, 1)]["judge"] == ["gpt-4", "single-math-v1"]
    assert got[("alpha", 111, 2)]["judge"] == ["gpt-4", "single-math-v1-multi-turn"]
    reference = read_answers(REFERENCES)[101][0]
    assert reference in got[("alpha", 101, 1)]["user_prompt"]
    assert reference not in got[("alpha", 81, 1)]["user_prompt"]

    errors = records(folder / "gpt-4_errors.jsonl")
    assert [(e["status"], e["gave_up"]) for e in errors if e["model"] == "alpha"] == [
        (429, False),
        (500, False),
    ]
    assert "rate_limit_exceeded" in errors[0]["body"]
    assert sorted(
        (e["status"], e["gave_up"]) for e in errors if (e["model"], e["question_id"]) == ("beta", 111)
    ) == [(503, False), (503, False), (503, True)]
    assert [e["gave_up"] for e in errors if (e["model"], e["question_id"]) == ("beta", 101)] == [True]
    assert any(e["status"] is None and "Timeout" in e["error"] for e in errors if e["model"] == "beta")

    alpha = result["scores"]["alpha"]  # -1 is counted, never averaged
    assert alpha["turn_1"] == pytest.approx((8 + 7 + 9.5) / 3, abs=1e-4)
    assert alpha["turn_2"] == pytest.approx((6 + 3) / 2)
    assert alpha["score"] == pytest.approx((8 + 6 + 7 + 9.5 + 3) / 5)
    assert alpha["categories"] == {"writing": 7.0, "reasoning": 7.0, "math": 6.25}
    assert (alpha["judgments"], alpha["unrated"], alpha["questions"]) == (6, 1, 3)
    # show_result.py's reading of the file agrees: drop -1, mean per (model, turn) and per model.
    frame = pd.read_json(out, lines=True)[["model", "score", "turn"]]
    frame = frame[frame["score"] != -1]
    by_turn = frame.groupby(["model", "turn"]).mean()["score"]
    assert by_turn[("alpha", 1)] == pytest.approx(alpha["turn_1"], abs=1e-4)
    assert by_turn[("beta", 2)] == pytest.approx(result["scores"]["beta"]["turn_2"])
    assert frame.groupby("model").mean()["score"]["alpha"] == pytest.approx(alpha["score"])
    table = (folder / "gpt-4_scores.md").read_text()
    assert "| alpha | 6.70 | 8.17 | 4.50 | 7.00 | 7.00 | 6.25 | 6 | 1 |" in table
    assert json.loads((folder / "gpt-4_scores.json").read_text()) == result["scores"]

    # Resume: the server is healthy now; only the two missing judgments are asked for.
    endpoint.script = {}
    before = len(endpoint.requests)
    again = judge(folder, QUESTIONS, settings(endpoint.url))
    assert (again["asked"], again["already"], again["failed"]) == (2, 10, 0)
    assert sorted(r["key"] for r in endpoint.requests[before:]) == [("beta", 101, 1), ("beta", 111, 2)]
    assert len(records(out)) == 12
    # A complete file: nothing is sent.
    before = len(endpoint.requests)
    assert judge(folder, QUESTIONS, settings(endpoint.url))["asked"] == 0
    assert len(endpoint.requests) == before
    # A run killed while writing: its last record cut short. The cut line goes; that one is asked again.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:40])
    cut = json.loads(lines[-1])
    resumed = judge(folder, QUESTIONS, settings(endpoint.url))
    assert (resumed["asked"], resumed["failed"]) == (1, 0)
    assert endpoint.requests[-1]["key"] == (cut["model"], cut["question_id"], cut["turn"])
    assert len(records(out)) == 12  # every line whole again
    # Another judge model is another file; this one is untouched.
    other = judge(folder, QUESTIONS, settings(endpoint.url, model="org/judge-7b"))
    assert other["asked"] == 12 and (folder / "model_judgment" / "org_judge-7b_single.jsonl").is_file()
    assert len(records(out)) == 12


def test_a_missing_key_or_input_fails_before_any_request(
    endpoint: Judge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_answers(tmp_path / "mt_bench", ("alpha",))
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"api_key_env: \\${KEY_ENV} is not set"):
        judge(folder, QUESTIONS, settings(endpoint.url))
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(FileNotFoundError, match="no answer file for \\['gamma'\\]"):
        judge(folder, QUESTIONS, settings(endpoint.url), models=["gamma"])
    (folder / "model_answer" / "alpha.jsonl").write_text(
        '{"question_id": 999, "choices": [{"turns": ["x"]}]}\n'
    )
    with pytest.raises(ValueError, match="question ids \\[999\\] are not in the question file"):
        judge(folder, QUESTIONS, settings(endpoint.url))
    assert endpoint.requests == []


def test_the_stage_command_judges_and_reports_failure_by_status(
    endpoint: Judge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m ray_jobs.judge` on an evaluation folder (answers under mt_bench/), keyless
    endpoint: status 1 while a judgment is missing, 0 once a re-run fills it."""
    write_answers(tmp_path / "eval" / "mt_bench", ("alpha",))
    endpoint.script = {("alpha", 111, 1): [OVERLOADED]}
    argv = [
        f"answers={tmp_path / 'eval'}",
        f"questions={QUESTIONS}",
        f"base_url={endpoint.url}",
        "model=local-judge",
        "api_key_env=null",
        "retries=0",
        f"judge_prompts={PROMPTS}",
        f"references={REFERENCES}",
    ]
    assert main(argv) == 1
    assert all(r["auth"] is None for r in endpoint.requests)
    endpoint.script = {}
    assert main(argv) == 0
    written = records(tmp_path / "eval" / "mt_bench" / "model_judgment" / "local-judge_single.jsonl")
    assert len(written) == 6 and {r["score"] for r in written} == {5}


def test_judging_is_off_by_default_in_the_evaluate_config() -> None:
    from ray_jobs.evaluate import EvaluateSettings

    repo = Path(__file__).resolve().parents[1]
    assert EvaluateSettings().judge.enabled is False
    shipped = load_config(JudgeConfig, repo / "configs" / "judge.yaml")
    assert (shipped.model, shipped.temperature, shipped.api_key_env) == ("gpt-4", 0.0, "OPENAI_API_KEY")


def test_evaluate_with_judging_on_fails_before_any_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate's judge section is checked (question file, judge inputs, the key) before Ray or a
    model starts: a generator folder holding only its sft_config.yaml gets no further."""
    from ray_jobs.evaluate import EvaluateConfig, run

    generator = tmp_path / "sft"
    generator.mkdir()
    (generator / "sft_config.yaml").write_text("generator: none\nexamples: {template: chat}\n")
    base = {"generator": str(generator), "data": str(tmp_path / "data"), "out": str(tmp_path / "eval")}
    judged = {
        "enabled": True,
        "api_key_env": KEY_ENV,
        "judge_prompts": str(PROMPTS),
        "references": str(REFERENCES),
    }
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match="judge.enabled: true, but mt_bench names no question file"):
        run(EvaluateConfig.model_validate(base | {"judge": judged}))
    with pytest.raises(ConfigError, match=f"\\${KEY_ENV} is not set"):
        run(EvaluateConfig.model_validate(base | {"judge": judged, "mt_bench": str(QUESTIONS)}))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        run(
            EvaluateConfig.model_validate(
                base | {"judge": judged | {"references": "/nowhere.jsonl"}, "mt_bench": str(QUESTIONS)}
            )
        )
    assert not (tmp_path / "eval").exists()


def test_helpsteer_judge_prints_the_scores(endpoint: Judge, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ray_jobs.cli import app

    folder = write_answers(tmp_path / "mt_bench", ("alpha",))
    endpoint.script = {("alpha", 81, 1): [SERVER_ERROR, completion("Rating: [[9]]")]}
    options = [
        "--answers",
        str(folder),
        "--base-url",
        endpoint.url,
        "--model",
        "local",
        "--api-key-env",
        "none",
    ]
    options += [
        "--questions",
        str(QUESTIONS),
        "--set",
        f"judge_prompts={PROMPTS}",
        "--set",
        f"references={REFERENCES}",
    ]
    result = CliRunner().invoke(app, ["judge", *options, "--set", "backoff_s=0"])
    assert result.exit_code == 0, result.output
    # turn 1: 9, 5, 5; turn 2: 5, 5, 5
    assert "alpha                    MT-Bench 5.6667 (turn 1 6.3333, turn 2 5.0; 0 unrated)" in result.output
    assert "(6 asked now, 0 kept)" in result.output
    again = CliRunner().invoke(app, ["judge", *options])
    assert again.exit_code == 0 and "(0 asked now, 6 kept)" in again.output
