"""MT-Bench judging end to end with our own Serve app as the judge (test_serve.py's app: a tiny
Llama generator behind the API key): one two-turn question, FastChat's records written, the
rating read from whatever the judge said, and a re-run that asks nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_judge import PROMPTS, QUESTIONS, REFERENCES, records
from test_serve import KEY, KEY_ENV, Served, served  # noqa: F401 - `served` is the module's app fixture

from helpsteer_core.mt_bench import RECORD_FIELDS, parse_rating
from ray_jobs.judge import JudgeEndpoint, judge

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not QUESTIONS.is_file(), reason="../shared/data/mt_bench is absent"),
]


def test_our_serve_app_judges_an_answer_file(
    served: Served,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    questions = tmp_path / "question.jsonl"
    question = json.loads(QUESTIONS.read_text().splitlines()[0])  # 81, writing, two turns
    questions.write_text(json.dumps(question) + "\n")
    answers = tmp_path / "mt_bench" / "model_answer"
    answers.mkdir(parents=True)
    answer = {
        "question_id": 81,
        "model_id": "helpsteer-tuned",
        "choices": [{"index": 0, "turns": ["Aloha!", "A!"]}],
    }
    (answers / "helpsteer-tuned.jsonl").write_text(json.dumps(answer) + "\n")
    settings = JudgeEndpoint(
        base_url=f"{served.url}/v1",
        model="helpsteer",
        api_key_env=KEY_ENV,
        max_tokens=16,  # the app's limit is 128; a tiny model's rating is noise anyway
        concurrency=2,
        retries=1,
        judge_prompts=str(PROMPTS),
        references=str(REFERENCES),
    )
    result = judge(tmp_path / "mt_bench", questions, settings)
    assert (result["asked"], result["failed"]) == (2, 0)
    written = records(tmp_path / "mt_bench" / "model_judgment" / "helpsteer_single.jsonl")
    assert sorted((r["turn"], r["judge"][1]) for r in written) == [
        (1, "single-v1"),
        (2, "single-v1-multi-turn"),
    ]
    for record in written:
        assert tuple(record) == RECORD_FIELDS and record["judge"][0] == "helpsteer"
        assert isinstance(record["judgment"], str) and record["score"] == parse_rating(record["judgment"])
        assert "Aloha!" in record["user_prompt"]
    scores = result["scores"]["helpsteer-tuned"]
    assert (scores["judgments"], scores["questions"]) == (2, 1)
    again = judge(tmp_path / "mt_bench", questions, settings)
    assert (again["asked"], again["already"]) == (0, 2)
