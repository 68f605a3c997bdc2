"""MT-Bench judging: FastChat's single-answer grading of our MT-Bench answers by any
OpenAI-compatible chat endpoint (OpenAI's GPT-4, a local vLLM, our own Serve app).

    helpsteer judge --answers runs/eval/mt_bench --model gpt-4            # key in $OPENAI_API_KEY
    helpsteer judge --answers runs/eval/mt_bench --base-url http://127.0.0.1:8000/v1 --model helpsteer \
        --api-key-env HELPSTEER_API_KEY
    python -m ray_jobs.judge --config configs/judge.yaml answers=/mnt/runs/eval/mt_bench

`answers` is a folder holding FastChat's `model_answer/<model>.jsonl` (the evaluate stage's
`mt_bench/`; an evaluation folder works too). Every answer of every model is judged at both turns
(`helpsteer_core.mt_bench` has FastChat's prompt and rating rules), and the folder gets:

- `model_judgment/<judge>_single.jsonl`: one FastChat record per judge reply, unparsable ones too
  (score -1), appended as the replies arrive: FastChat's `show_result.py --input-file` reads it;
- `<judge>_scores.md` / `.json`: per model the MT-Bench score, the turn and category means;
- `<judge>_errors.jsonl`: every failed attempt (HTTP status and body, or the network error).

Requests run concurrently (asyncio, at most `concurrency` in flight); 429, 5xx, timeouts and
connection errors are retried with exponential backoff (honouring Retry-After), other 4xx are not.
A match that still has no reply is left out of the judgment file, so a re-run (or a run killed
half way) asks only for what is missing. `<judge>` is the judge model with `/` as `_`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from pydantic import Field

from helpsteer_core.config import ConfigError, StrictModel, resolve_path
from helpsteer_core.mt_bench import (
    Match,
    judgment_record,
    plan_matches,
    read_answers,
    read_judge_prompts,
    read_questions,
    record_key,
    render_scores,
    summarize,
)
from helpsteer_core.readers import SourceError
from ray_jobs.runtime import stage_main

log = logging.getLogger("helpsteer.judge")
RETRYABLE = frozenset({408, 409, 429})  # and every 5xx, as OpenAI's own client retries


class JudgeEndpoint(StrictModel):
    """The judge: an OpenAI-compatible chat endpoint, and how to ask it."""

    base_url: str = "https://api.openai.com/v1"  # POST {base_url}/chat/completions
    model: str = "gpt-4"  # the judge model; also names the output file, as in FastChat
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable with the key; null: no key sent
    temperature: float = Field(0.0, ge=0)  # FastChat's
    max_tokens: int = Field(2048, ge=1)  # FastChat's for GPT-4; lower it for a small local judge
    concurrency: int = Field(8, ge=1)  # requests in flight at once
    retries: int = Field(6, ge=0)  # further attempts after a 429, a 5xx, a timeout or a lost connection
    backoff_s: float = Field(2.0, ge=0)  # first wait; doubles per attempt (with jitter) up to max_backoff_s
    max_backoff_s: float = Field(60.0, ge=0)
    timeout_s: float = Field(300.0, gt=0)  # one request, reply included
    judge_prompts: str = "../shared/data/mt_bench/judge_prompts.jsonl"  # FastChat's judge_prompts.jsonl
    # GPT-4's reference answers for the math, reasoning and coding questions (FastChat's
    # reference_answer/gpt-4.jsonl), whatever the judge model is.
    references: str = "../shared/data/mt_bench/reference_answer_gpt-4.jsonl"


class EvaluateJudge(JudgeEndpoint):
    """The evaluate config's `judge:` section: judge the MT-Bench answers once they are written."""

    enabled: bool = False  # off: the answers are written, nobody is asked


class JudgeConfig(JudgeEndpoint):
    """The judge stage."""

    answers: str  # a folder with model_answer/<model>.jsonl (an evaluation's mt_bench/, or the evaluation)
    questions: str = "../shared/data/mt_bench/question.jsonl"  # FastChat's question.jsonl
    models: list[str] = []  # answer files (model names) to judge; empty: all of them


def judge_file_name(model: str) -> str:
    return model.replace("/", "_")


def answers_folder(path: Path) -> Path:
    """The folder holding `model_answer/`: `path`, or its `mt_bench/` (an evaluation folder)."""
    for folder in (path, path / "mt_bench"):
        if (folder / "model_answer").is_dir():
            return folder
    raise FileNotFoundError(
        f"{path}: no model_answer/ folder (FastChat's answers), nor mt_bench/model_answer/"
    )


def read_judgments(path: Path) -> list[dict[str, Any]]:
    """The records already in a judgment file. A last line cut short (a run killed while writing)
    is removed from the file and logged; a bad line elsewhere is someone else's file: an error."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_key(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):  # no newline after it: the write was cut off
                log.warning("judge: %s: dropping a cut-off last line (%d chars)", path, len(line))
                path.write_text(text[: len(text) - len(line)], encoding="utf-8")
                break
            raise SourceError(f"{path}:{number}: not a FastChat judgment record") from None
        records.append(record)
    return records


def _wait(attempt: int, settings: JudgeEndpoint, retry_after: str | None) -> float:
    """Seconds before the next attempt: the server's Retry-After when it gives one, else
    exponential backoff with jitter; never more than max_backoff_s."""
    if retry_after is not None:
        try:
            return min(float(retry_after), settings.max_backoff_s)
        except ValueError:
            pass  # an HTTP date, or junk: our own backoff
    return min(settings.backoff_s * 2**attempt * (0.5 + random.random() / 2), settings.max_backoff_s)


async def _ask(session: Any, match: Match, settings: JudgeEndpoint, errors: TextIO) -> str | None:
    """The judge's reply text, or None when every attempt failed (each failure goes to `errors`)."""
    import aiohttp

    body = {
        "model": settings.model,
        "messages": match.messages(),
        "n": 1,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
    }
    url = settings.base_url.rstrip("/") + "/chat/completions"
    for attempt in range(settings.retries + 1):
        retry_after = None
        try:
            async with session.post(url, json=body) as response:
                text = await response.text()
                if response.status == 200:
                    try:
                        content = json.loads(text)["choices"][0]["message"]["content"]
                        return str(content or "")
                    except (ValueError, KeyError, IndexError, TypeError):
                        failure: dict[str, Any] = {
                            "status": 200,
                            "error": "not a chat completion",
                            "body": text,
                        }
                else:
                    failure = {"status": response.status, "body": text[:4000]}
                    ms = response.headers.get("retry-after-ms")  # OpenAI's, finer than Retry-After
                    retry_after = f"{ms}e-3" if ms else response.headers.get("retry-after")
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
        status = failure["status"]
        retryable = status is None or status == 200 or status in RETRYABLE or status >= 500
        last = attempt == settings.retries or not retryable
        errors.write(
            json.dumps(
                {
                    "question_id": match.question_id,
                    "model": match.model,
                    "turn": match.turn,
                    "judge": list(match.judge),
                    "attempt": attempt + 1,
                    **failure,
                    "gave_up": last,
                    "tstamp": time.time(),
                }
            )
            + "\n"
        )
        errors.flush()
        if last:
            log.warning(
                "judge: question %s turn %s of %s: no reply after %d attempt(s) (%s)",
                match.question_id,
                match.turn,
                match.model,
                attempt + 1,
                failure.get("status") or failure.get("error"),
            )
            return None
        await asyncio.sleep(_wait(attempt, settings, retry_after))
    return None


async def _judge_all(
    matches: list[Match], settings: JudgeEndpoint, key: str | None, out: Path, errors: Path
) -> int:
    """Asks for every match, appending each reply's record to `out` as it arrives; returns how
    many matches got no reply."""
    import aiohttp

    bound = asyncio.Semaphore(settings.concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
    done = failed = 0
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as records, errors.open("a", encoding="utf-8") as error_log:
        connector = aiohttp.TCPConnector(limit=settings.concurrency)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:

            async def one(match: Match) -> None:
                nonlocal done, failed
                async with bound:
                    judgment = await _ask(session, match, settings, error_log)
                if judgment is None:
                    failed += 1
                    return
                records.write(json.dumps(judgment_record(match, judgment)) + "\n")
                records.flush()  # a killed run keeps every reply it got
                done += 1
                if done % 20 == 0 or done + failed == len(matches):
                    log.info(
                        "judge: %d/%d judged, %d failed, %.0f s",
                        done,
                        len(matches),
                        failed,
                        time.monotonic() - started,
                    )

            await asyncio.gather(*(one(m) for m in matches))
    return failed


def _api_key(settings: JudgeEndpoint) -> str | None:
    if settings.api_key_env is None:
        return None
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        raise ConfigError(
            f"api_key_env: ${settings.api_key_env} is not set; export the judge's API key there, or set "
            "api_key_env: null for an endpoint that takes none"
        )
    return key


def check_ready(settings: JudgeEndpoint) -> str | None:
    """Reads the judge prompts and references and looks up the key (returned): what a stage that
    judges at its end checks before its expensive work."""
    read_judge_prompts(resolve_path(settings.judge_prompts))
    read_answers(resolve_path(settings.references))
    return _api_key(settings)


def judge(
    answers: Path, questions: Path, settings: JudgeEndpoint, models: Sequence[str] = ()
) -> dict[str, Any]:
    """Judges what `answers/model_judgment/<judge>_single.jsonl` lacks, then writes the score
    table; returns {"judgment_file", "asked", "already", "failed", "missing", "scores"}."""
    folder = answers_folder(answers)
    files = sorted((folder / "model_answer").glob("*.jsonl"))
    chosen = {f.stem: f for f in files if not models or f.stem in models}
    if models and set(models) - set(chosen):
        raise FileNotFoundError(
            f"{folder / 'model_answer'}: no answer file for {sorted(set(models) - set(chosen))}; "
            f"found {[f.stem for f in files]}"
        )
    if not chosen:
        raise FileNotFoundError(f"{folder / 'model_answer'}: no answer files (<model>.jsonl)")
    # Every input is read and checked, and the key looked up, before the first request.
    question_rows = read_questions(resolve_path(questions))
    prompts = read_judge_prompts(resolve_path(settings.judge_prompts))
    references = read_answers(resolve_path(settings.references))
    key = _api_key(settings)
    per_model = {model: read_answers(path) for model, path in chosen.items()}
    try:
        matches, missing = plan_matches(question_rows, per_model, prompts, references, settings.model)
    except SourceError as exc:
        raise SourceError(f"{folder / 'model_answer'}: {exc}") from None
    for model, ids in missing.items():
        if ids:
            log.warning(
                "judge: %s answered %d of %d questions; the others are not judged",
                model,
                len(question_rows) - len(ids),
                len(question_rows),
            )
    name = judge_file_name(settings.model)
    out = folder / "model_judgment" / f"{name}_single.jsonl"
    done = {record_key(r) for r in read_judgments(out)}
    todo = [m for m in matches if m.key not in done]
    log.info(
        "judge: %d judgments for %d model(s) by %s at %s: %d recorded already, %d to ask",
        len(matches),
        len(chosen),
        settings.model,
        settings.base_url,
        len(matches) - len(todo),
        len(todo),
    )
    failed = asyncio.run(_judge_all(todo, settings, key, out, folder / f"{name}_errors.jsonl")) if todo else 0
    wanted = {m.key for m in matches}
    records = [r for r in read_judgments(out) if record_key(r) in wanted]
    scores = summarize(records, question_rows)
    (folder / f"{name}_scores.json").write_text(json.dumps(scores, indent=2))
    (folder / f"{name}_scores.md").write_text(render_scores(scores, settings.model))
    if failed:
        log.error(
            "judge: %d judgments got no reply (see %s); run again to ask only for them",
            failed,
            folder / f"{name}_errors.jsonl",
        )
    return {
        "judgment_file": str(out),
        "asked": len(todo),
        "already": len(matches) - len(todo),
        "failed": failed,
        "missing": {m: ids for m, ids in missing.items() if ids},
        "scores": scores,
    }


def run(config: JudgeConfig) -> dict[str, Any]:
    return judge(resolve_path(config.answers), resolve_path(config.questions), config, config.models)


def main(argv: Sequence[str] | None = None) -> int:
    outcome: dict[str, Any] = {}

    def run_and_keep(config: JudgeConfig) -> None:
        outcome.update(run(config) or {})  # `or {}`: the docs test stands in a `run` returning None

    status = stage_main(__doc__, "python -m ray_jobs.judge", JudgeConfig, run_and_keep, argv)
    if status == 0 and outcome.get("failed"):
        print(
            f"error: {outcome['failed']} judgments got no reply; run again to ask only for them",
            file=sys.stderr,
        )
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
