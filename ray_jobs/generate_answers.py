"""The untuned generator writes its own training answers, several per question, on Ray Data.

    python -m ray_jobs.generate_answers --config configs/generate_answers.yaml [key=value ...]
    helpsteer generate-answers --out runs/answers [--set questions=240]
    ray job submit --working-dir . -- python -m ray_jobs.generate_answers \
        --config configs/generate_answers.yaml out=/mnt/runs/answers

SteerLM's bootstrapping shape for the embedded default (`helpsteer_core.answers`): `questions`
everyday questions from the shipped bank, each answered once per style (an instruction for a
length or a register added to the question), on a Ray Data actor pool of `actors` generators.
The relabel stage then gives every answer the APM's attributes, and AC-SFT trains on the plain
question, those attributes and the answer. Kept answers go to `out/kept/part-000000.parquet` (one
that ran out of `max_new_tokens` is cut back to its last full sentence, `cut_at_sentence`); an
answer that is empty, a loop, or has no sentence end in its second half goes to
`out/rejects/rejects.jsonl` with its reason, and `out/stats.json` reconciles: requested = kept +
rejected, per style too. With `shorter: [N, ...]`, kept/ also holds each kept answer cut to its
first N sentences (where it has more), marked by `first_sentences` and counted as
`shorter_versions`: rows = kept + shorter_versions.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from helpsteer_core.answers import (
    STYLES,
    answer_requests,
    answer_row,
    judge_answer,
    pick_questions,
    shorter_rows,
)
from helpsteer_core.config import dump_config, resolve_path
from helpsteer_core.generator import SMOLLM2
from helpsteer_core.outputs import prepare_output, publish
from helpsteer_core.sft_data import SFTDataConfig
from ray_jobs.generation import GenerationSettings, generate_on_ray
from ray_jobs.runtime import ensure_ray, quiet_ray_data, stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.generate_answers")
KEPT = "kept"  # out/kept/: the answers to relabel and train on (out/rejects/ is never read as data)


class AnswersSettings(GenerationSettings):
    """What to write; the pipeline profile's `answers:` section."""

    questions: int = Field(240, ge=1)  # distinct questions from the bank (a seeded sample)
    # Each question is answered once per style (helpsteer_core.answers.STYLES); "detailed" is left
    # out by default: most of its answers run past max_new_tokens and are cut back anyway. The four
    # registers are shown by an example exchange first: told only, a small model writes two.
    styles: list[str] = [
        "one_sentence",
        "brief",
        "plain",
        "child_example",
        "simple_example",
        "technical_example",
        "specialist_example",
    ]
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, ge=1.0)
    # Each kept answer with more than N sentences also yields a version cut to its first N, for
    # each N here: lengths spread with the content fixed (helpsteer_core.answers.shorter_rows).
    shorter: list[Annotated[int, Field(ge=1)]] = []


class AnswersConfig(AnswersSettings):
    """The answers stage."""

    generator: str = SMOLLM2  # the untuned model that writes the answers (the one AC-SFT tunes)
    examples: SFTDataConfig = SFTDataConfig(template="chat")  # how it is prompted: AC-SFT's template
    out: str
    tracking: TrackingConfig = TrackingConfig()


def run(config: AnswersConfig) -> dict[str, Any]:
    started = time.perf_counter()
    out = resolve_path(config.out)
    staging = prepare_output(out, "generate_answers")  # a folder this stage did not write is refused now
    requests = answer_requests(pick_questions(config.questions, config.seed), config.styles)
    model = config.generator  # resolved by each generator actor on its node, never here
    resolved = config.model_copy(update={"out": str(out)})
    log.info(
        "answers: %d questions x %d styles = %d answers by %s, at most %d new tokens each",
        config.questions,
        len(config.styles),
        len(requests),
        config.generator,
        config.max_new_tokens,
    )
    ensure_ray()
    quiet_ray_data()
    (staging / "rejects").mkdir(parents=True)
    (staging / KEPT).mkdir()
    style_order = {style: i for i, style in enumerate(STYLES)}
    with stage_run("generate_answers", resolved, config.tracking) as tracked:
        answers = generate_on_ray(
            model,
            [
                {
                    "request_id": i,
                    "turns": json.dumps(r.turns()),
                    "attributes": "null",  # the untuned model is asked plainly, with no attribute line
                    "order": style_order[r.style],
                }
                for i, r in enumerate(requests)
            ],
            config,
            config.examples.model_dump(),
        )
        kept, rejects = [], []
        for i, request in enumerate(requests):
            answer = answers[i]
            verdict = judge_answer(str(answer["response"]), bool(answer["finished"]), config.max_new_tokens)
            row = answer_row(request, verdict, int(answer["new_tokens"]), config.generator)
            if verdict.reason is None:
                kept.append(row)
            else:
                rejects.append({**row, "reason": verdict.reason})
        if not kept:
            raise RuntimeError(
                f"answers: none of {len(requests)} answers was kept ({_stats(requests, kept, rejects, 0)}); "
                f"the reasons are in {staging / 'rejects' / 'rejects.jsonl'}"
            )
        shorter = shorter_rows(kept, config.shorter)
        pq.write_table(pa.Table.from_pylist(kept + shorter), staging / KEPT / "part-000000.parquet")
        (staging / "rejects" / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
        stats = _stats(requests, kept, rejects, time.perf_counter() - started, shorter)
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (staging / "config.yaml").write_text(dump_config(resolved))
        publish(staging, out, "generate_answers")
        tracked.log_metrics({k: v for k, v in stats.items() if not isinstance(v, dict)})
        tracked.log_outputs({"stats.json": out / "stats.json", "out": out})
    log.info(
        "answers: %d kept, %d rejected (%s) in %.0f s -> %s",
        stats["kept"],
        stats["rejected"],
        out / "rejects" / "rejects.jsonl",
        stats["seconds"],
        out,
    )
    return stats


def _stats(
    requests: Sequence[Any],
    kept: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    seconds: float,
    shorter: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    tokens = sum(r["new_tokens"] for r in kept + rejects)
    by_style = {
        style: {
            "requested": sum(r.style == style for r in requests),
            "kept": sum(r["style"] == style for r in kept),
            "rejected": sum(r["style"] == style for r in rejects),
            "median_words": _median([len(r["response"].split()) for r in kept if r["style"] == style]),
            "shorter_versions": sum(r["style"] == style for r in shorter),
        }
        for style in dict.fromkeys(r.style for r in requests)
    }
    return {
        "requested": len(requests),
        "kept": len(kept),
        "rejected": len(rejects),
        "reconciles": len(requests) == len(kept) + len(rejects),
        # Rows in kept/: every kept answer plus its shorter versions (first_sentences = N).
        "shorter_versions": len(shorter),
        "rows": len(kept) + len(shorter),
        "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejects)),
        "cut_at_sentence": sum(r["cut_at_sentence"] for r in kept),
        "by_style": by_style,
        "new_tokens": tokens,
        "seconds": round(seconds, 1),
        "new_tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0,
    }


def _median(values: list[int]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.generate_answers", AnswersConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
