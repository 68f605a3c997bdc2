"""Steerability evaluation: attribute sweeps on held-out prompts, generated on Ray Data.

    python -m ray_jobs.evaluate --config configs/evaluate.yaml [key=value ...]
    helpsteer evaluate --generator runs/sft --apm runs/apm --data runs/filtered/validation --out runs/eval
    ray job submit --working-dir . -- python -m ray_jobs.evaluate --config configs/evaluate.yaml \
        generator=/mnt/runs/sft apm=/mnt/runs/apm data=/mnt/runs/filtered/validation out=/mnt/runs/eval

For the first `prompts` distinct prompts of `data`, each attribute in `attributes` is asked for at
0..4 with the others at the `defaults` profile (`helpsteer_core.steering`). The fine-tuned
generator and the baseline (by default the model it was fine-tuned from, read from its
`sft_config.yaml`) answer the same prompts; generation runs in a Ray Data actor pool. Every
response is measured (words, Flesch-Kincaid grade, the APM's attributes) and the stage writes
`responses.parquet`, `metrics.json`, one PNG per attribute and `report.md` to `out`, and logs them
to MLflow. `mt_bench=FILE` also answers FastChat's MT-Bench questions (both turns) with the
`mt_bench_attributes` (`mt_bench_per_category=N`: the first N of each category) and writes
FastChat's `model_answer/<model_id>.jsonl` under `out/mt_bench`;
with `judge.enabled` an OpenAI-compatible judge then grades them there (`ray_jobs.judge`).

`real_prompts=[FILE, ...]` adds real-style prompts (`helpsteer_core.prompt_files`): the first
`real_relevance_prompts` are answered at the defaults and scored for prompt-answer relevance
(`helpsteer_core.relevance`), so a model that follows the knobs with off-topic filler shows, and
`real_attribute_prompts` sweeps attributes on them too. Every request, synthetic or real, goes
into one generation pass per model; records carry `prompt_set` ("synthetic" or "real").
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from helpsteer_core.apm import AttributePredictionModel, load_trained_attributes, predict
from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, HELPSTEER_ATTRIBUTES, STEERLM
from helpsteer_core.config import ConfigError, dump_config, resolve_path
from helpsteer_core.conversation import parse_prompt_turns
from helpsteer_core.generator import read_training_setup
from helpsteer_core.model_sources import MINILM, resolve_model_path
from helpsteer_core.mt_bench import per_category
from helpsteer_core.mt_bench import read_questions as read_mt_bench
from helpsteer_core.outputs import prepare_output, publish
from helpsteer_core.prompt_files import read_prompt_file, real_prompts
from helpsteer_core.readers import read_parquet_rows
from helpsteer_core.relevance import describe as describe_relevance
from helpsteer_core.relevance import ratio_interval
from helpsteer_core.relevance import relevance as relevance_scores
from helpsteer_core.steering import (
    measure,
    measures_for,
    render_real_section,
    render_report,
    steerability,
    sweep,
)
from ray_jobs.generation import GenerationSettings, generate_on_ray
from ray_jobs.judge import EvaluateJudge, check_ready, judge
from ray_jobs.runtime import ensure_ray, quiet_ray_data, run_as_task, stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.evaluate")
SCHEMA = STEERLM


class EvaluateSettings(GenerationSettings):
    """How to evaluate; the pipeline profile's `evaluate:` section."""

    prompts: int = Field(20, ge=1)  # distinct held-out prompts per sweep
    # Per-attribute prompt counts that replace `prompts`, e.g. {verbosity: 20} with prompts: 8.
    attribute_prompts: dict[str, int] = {}
    attributes: list[str] = list(HELPSTEER_ATTRIBUTES)  # the attributes swept 0..4
    defaults: Literal["helpsteer", "helpsteer2"] = "helpsteer2"  # the other attributes' values
    mt_bench: str | None = None  # FastChat question.jsonl, e.g. ../shared/data/mt_bench/question.jsonl
    mt_bench_attributes: dict[str, int] | None = None  # default: the `defaults` profile
    mt_bench_max_new_tokens: int = Field(512, ge=1)
    # Only the first N questions of each category (None: all 80); 1 gives the eight categories.
    mt_bench_per_category: int | None = Field(None, ge=1)
    # Judge the MT-Bench answers when written (ray_jobs.judge): off by default, as it needs an
    # endpoint (e.g. base_url, model and api_key_env of OpenAI's GPT-4, or a local server).
    judge: EvaluateJudge = EvaluateJudge()
    # Real-style prompt files (.jsonl rows with `prompt` or `turns`, or .txt one per line), mixed
    # round robin, e.g. [../shared/data/helpsteer2/train_rows_001_060.jsonl,
    # ../shared/data/mt_bench/question.jsonl]; empty = no real-prompt evaluation.
    real_prompts: list[str] = []
    real_relevance_prompts: int = Field(24, ge=1)  # real prompts asked at the defaults, for relevance
    # Attribute -> real prompts swept 0..4 for it, e.g. {verbosity: 20, complexity: 20}; each must
    # be one of `attributes`. Empty = relevance only.
    real_attribute_prompts: dict[str, int] = {}
    relevance_encoder: str = MINILM  # sentence encoder of the prompt-answer cosine (helpsteer_core.relevance)


class EvaluateConfig(EvaluateSettings):
    """The evaluation stage."""

    generator: str  # the AC-SFT output folder
    # The untuned model for the baseline row: "auto" = the model the generator was fine-tuned from
    # (its sft_config.yaml), a hub id or folder, or "none" to skip the baseline.
    baseline: str = "auto"
    apm: str | None = None  # a trained APM folder; None skips the APM measures
    data: str  # Parquet rows with a `prompt` column (held out from training)
    out: str
    tracking: TrackingConfig = TrackingConfig()


def held_out_prompts(data: Path, count: int) -> list[str]:
    """The first `count` distinct prompts of `data`, in file order."""
    prompts: list[str] = []
    for row in read_parquet_rows(data):
        if row["prompt"] not in prompts:
            prompts.append(row["prompt"])
        if len(prompts) == count:
            return prompts
    raise ConfigError(f"{data}: {len(prompts)} distinct prompts, fewer than prompts={count}")


@dataclass(frozen=True)
class Ask:
    """One answer the evaluation records: a sweep request, or (attribute None) a real prompt at the
    defaults asked for relevance only."""

    prompt_set: str  # "synthetic" (the held-out split) or "real" (`real_prompts` files)
    prompt_id: int
    attribute: str | None
    level: int | None
    attributes: dict[str, int]

    @property
    def key(self) -> tuple[str, int, str]:
        """Equal asks share one generated answer."""
        return self.prompt_set, self.prompt_id, json.dumps(self.attributes, sort_keys=True)


def _check_counts(field: str, counts: dict[str, int], attributes: list[str]) -> None:
    for name, count in counts.items():
        if name not in attributes or count < 1:
            raise ConfigError(
                f"{field}: {name}: {count}; allowed: a swept attribute "
                f"({', '.join(attributes)}) and a count of at least 1"
            )


def _plan(
    counts: dict[str, int], real_counts: dict[str, int], relevance_prompts: int, defaults: dict[str, int]
) -> list[Ask]:
    """The synthetic sweeps, the real sweeps, then the real prompts asked at the defaults."""
    plan = [
        Ask(prompt_set, r.prompt_id, r.attribute, r.level, r.attributes)
        for prompt_set, per in (("synthetic", counts), ("real", real_counts))
        for a, n in per.items()
        for r in sweep(n, [a], defaults, SCHEMA)
    ]
    return plan + [Ask("real", p, None, None, dict(defaults)) for p in range(relevance_prompts)]


def _plot(
    results: dict[str, dict[str, list[dict[str, Any]]]], out: Path, prefix: str = "steer", prompts: str = ""
) -> list[Path]:
    """`<prefix>_<attribute>.png` per swept attribute; `prompts` names the prompt set in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(results)
    for attribute, figures in results[models[0]].items():
        fig, axes = plt.subplots(1, len(figures), figsize=(4.5 * len(figures), 3.6), squeeze=False)
        for index, figure in enumerate(figures):
            ax = axes[0][index]
            for model in models:
                means = results[model][attribute][index]["mean_by_level"]
                rho = results[model][attribute][index]["within_prompt"]
                ax.plot(list(means), list(means.values()), marker="o", label=f"{model} (rho {rho:.2f})")
            ax.set_xlabel(f"requested {attribute}")
            ax.set_ylabel(figure["measure"])
            ax.set_xticks(list(figure["mean_by_level"]))
            ax.legend(fontsize=8)
        fig.suptitle(f"{attribute} sweep{prompts}: mean measure per requested level")
        fig.tight_layout()
        path = out / f"{prefix}_{attribute}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run(config: EvaluateConfig) -> dict[str, Any]:
    generator, data, out = resolve_path(config.generator), resolve_path(config.data), resolve_path(config.out)
    staging = prepare_output(out, "evaluate")  # a folder this stage did not write is refused now
    apm = resolve_path(config.apm) if config.apm else None
    setup = read_training_setup(generator)
    if config.mt_bench:
        read_mt_bench(resolve_path(config.mt_bench))  # a bad question file fails before any generation
    if config.judge.enabled:
        if not config.mt_bench:
            raise ConfigError("judge.enabled: true, but mt_bench names no question file to answer and judge")
        check_ready(config.judge)  # judge prompts, references and the API key, before any generation
    for name, value in (config.mt_bench_attributes or {}).items():
        SCHEMA.check_value(name, value)
    examples = setup["examples"]
    baseline = setup["generator"] if config.baseline == "auto" else config.baseline
    models = {"tuned": str(generator)} | ({} if baseline == "none" else {"baseline": baseline})
    defaults = {k: v for k, v in DEFAULT_ATTRIBUTES[config.defaults].items()}
    for name in config.attributes:
        SCHEMA.index(name)  # an unknown attribute is named before anything else is checked
    _check_counts("attribute_prompts", config.attribute_prompts, config.attributes)
    _check_counts("real_attribute_prompts", config.real_attribute_prompts, config.attributes)
    counts = {a: config.attribute_prompts.get(a, config.prompts) for a in config.attributes}
    real_counts = {
        a: config.real_attribute_prompts[a] for a in config.attributes if a in config.real_attribute_prompts
    }
    real_files = [resolve_path(f) for f in config.real_prompts]
    if real_counts and not real_files:
        raise ConfigError("real_attribute_prompts: set, but real_prompts names no prompt files to sweep on")
    prompts = {"synthetic": held_out_prompts(data, max(counts.values()))}
    if real_files:  # bad files and an unknown encoder fail here, before any generation
        prompts["real"] = real_prompts(
            real_files, max([config.real_relevance_prompts, *real_counts.values()])
        )
        resolve_model_path(config.relevance_encoder)
    plan = _plan(counts, real_counts, config.real_relevance_prompts if real_files else 0, defaults)
    # The all-defaults request of a prompt recurs in every attribute's sweep (and, for a real
    # prompt, serves relevance too): generated once.
    unique: dict[tuple[str, int, str], int] = {}
    for ask in plan:
        unique.setdefault(ask.key, len(unique))
    requests = [
        {
            "request_id": i,
            "attributes": attributes,
            "turns": json.dumps([vars(t) for t in parse_prompt_turns(prompts[prompt_set][prompt_id])]),
            "order": json.loads(attributes).get("verbosity", 0),
        }
        for (prompt_set, prompt_id, attributes), i in unique.items()
    ]
    resolved = config.model_copy(
        update={
            "generator": str(generator),
            "data": str(data),
            "out": str(out),
            "apm": str(apm) if apm else None,
            "real_prompts": [str(f) for f in real_files],
        }
    )
    ensure_ray()
    quiet_ray_data()
    staging.mkdir(parents=True)
    with stage_run("evaluate", resolved, config.tracking, SCHEMA) as tracked:
        records: list[dict[str, Any]] = []
        timing = {}
        for name, model in models.items():
            started = time.perf_counter()
            answers = generate_on_ray(model, requests, config, examples)
            timing[name] = time.perf_counter() - started
            log.info("evaluate: %s answered %d requests in %.0f s", name, len(requests), timing[name])
            for ask in plan:
                answer = answers[unique[ask.key]]
                records.append(
                    {
                        "model": name,
                        "prompt_set": ask.prompt_set,
                        "prompt_id": ask.prompt_id,
                        "attribute": ask.attribute,
                        "level": ask.level,
                        "attributes": json.dumps(ask.attributes),
                        "prompt": prompts[ask.prompt_set][ask.prompt_id],
                        "response": answer["response"],
                        "new_tokens": int(answer["new_tokens"]),
                        "finished": bool(answer["finished"]),
                        **measure(answer["response"]),
                    }
                )
        # The APM and the relevance encoder run in a task with an actor's resources, not here.
        records, relevance = run_as_task(
            _model_scores,
            apm,
            records,
            defaults,
            config.relevance_encoder if real_files else None,
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor,
            pass_device=True,
        )
        results = _sweep_results(records, list(models), "synthetic", list(counts))
        real_results = _sweep_results(records, list(models), "real", list(real_counts)) if real_counts else {}
        pq.write_table(pa.Table.from_pylist(records), staging / "responses.parquet")
        synthetic = [r for r in records if r["prompt_set"] == "synthetic"]
        report_setup = {
            "generator": str(generator),
            "baseline": baseline,
            "apm": str(apm) if apm else "none",
            "held-out prompts": f"{', '.join(f'{a} {n}' for a, n in counts.items())} from {data}",
            "defaults": f"{config.defaults} {defaults}",
            "decoding": f"temperature {config.temperature}, max_new_tokens {config.max_new_tokens}",
            "time": _timing(timing, generator),
            "responses that ended on their own": ", ".join(
                f"{m} {sum(r['finished'] for r in synthetic if r['model'] == m)}"
                f"/{sum(r['model'] == m for r in synthetic)}"
                for m in models
            ),
        }
        report = render_report(results, report_setup)
        real_setup: dict[str, Any] = {}
        if real_files:
            real_setup = _real_setup(real_files, prompts["real"], config, real_counts, defaults)
            report += "\n" + render_real_section(
                real_setup,
                relevance,
                describe_relevance(config.relevance_encoder),
                real_results,
                _side_by_side(records, list(models), defaults, 5),
            )
        (staging / "report.md").write_text(report)
        metrics = {"setup": report_setup, "results": results}
        metrics |= {"real_setup": real_setup, "real_results": real_results, "relevance": relevance}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "evaluate_config.yaml").write_text(dump_config(resolved))
        plots = _plot(results, staging)
        if real_results:
            plots += _plot(real_results, staging, "steer_real", " on real prompts")
        if config.mt_bench:
            _mt_bench(config, models, examples, staging / "mt_bench", defaults)
        publish(staging, out, "evaluate")
        mt_bench_scores: dict[str, Any] = {}
        if config.mt_bench and config.judge.enabled:
            # After publishing: the judgment file grows in place, so a failed or killed judging
            # keeps the answers and every reply, and `helpsteer judge --answers OUT` finishes it.
            judged = judge(out / "mt_bench", resolve_path(config.mt_bench), config.judge)
            mt_bench_scores = judged["scores"]
            tracked.log_metrics({"mt_bench": {m: s["score"] for m, s in mt_bench_scores.items()}})
        summary, real_summary = _summary(results), _summary(real_results)
        tracked.log_metrics(
            {"steer": summary, "steer_real": real_summary, "relevance": relevance, "seconds": timing}
        )
        tracked.log_outputs({"evaluation": out})
    log.info("evaluate: report in %s; %d plots", out / "report.md", len(plots))
    return {
        "out": str(out),
        "steerability": summary,
        "results": results,
        "real_results": real_results,
        "real_steerability": real_summary,
        "relevance": relevance,
        "mt_bench": mt_bench_scores,  # model -> MT-Bench scores when judge.enabled, else empty
    }


def _summary(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> attribute -> {measure: within-prompt rho}."""
    return {
        model: {
            a: {f["measure"]: round(f["within_prompt"], 4) for f in figures} for a, figures in per.items()
        }
        for model, per in results.items()
    }


def _sweep_results(
    records: list[dict[str, Any]], models: list[str], prompt_set: str, attributes: list[str]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """model -> attribute -> `steerability` figures per measure, over one prompt set's sweeps."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in models:
        mine = [r for r in records if r["model"] == name and r["prompt_set"] == prompt_set]
        results[name] = {
            attribute: [
                steerability(mine, attribute, key) for key in measures_for(attribute) if key in mine[0]
            ]
            for attribute in attributes
        }
    return results


def _last_user_text(prompt: str) -> str:
    """What a multi-turn prompt asks now: its last User turn (relevance compares the answer to it)."""
    return [t.text for t in parse_prompt_turns(prompt) if t.role == "User"][-1]


def _is_default(record: dict[str, Any], defaults: dict[str, int]) -> bool:
    return bool(record["prompt_set"] == "real" and json.loads(record["attributes"]) == defaults)


def _relevance(records: list[dict[str, Any]], defaults: dict[str, int], encoder: str) -> dict[str, Any]:
    """Prompt-answer cosine of every real prompt's default-attribute answer, scored once per
    (model, prompt) and written to each of its records (`relevance`; NaN elsewhere); returns
    model -> summary, plus `relevance_ratio` (tuned mean / baseline mean) with a baseline."""
    answered: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        r["relevance"] = float("nan")
        if _is_default(r, defaults):
            answered.setdefault((r["model"], r["prompt_id"]), []).append(r)
    firsts = [group[0] for group in answered.values()]
    scores = relevance_scores(
        [_last_user_text(r["prompt"]) for r in firsts], [r["response"] for r in firsts], encoder
    )
    for group, score in zip(answered.values(), scores, strict=True):
        for r in group:
            r["relevance"] = score
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in firsts):
        mine = [r for r in firsts if r["model"] == model]
        summary[model] = {
            "prompts": len(mine),
            "mean_cosine": round(float(statistics.fmean(r["relevance"] for r in mine)), 4),
            "median_words": float(statistics.median(r["words"] for r in mine)),
            "ended_on_own": sum(bool(r["finished"]) for r in mine),
            "answers": len(mine),
        }
    if "tuned" in summary and "baseline" in summary and summary["baseline"]["mean_cosine"] > 0:
        summary["relevance_ratio"] = round(
            summary["tuned"]["mean_cosine"] / summary["baseline"]["mean_cosine"], 4
        )
        by_prompt = {(r["model"], r["prompt_id"]): r["relevance"] for r in firsts}
        paired = [p for m, p in by_prompt if m == "tuned" and ("baseline", p) in by_prompt]
        if len(paired) >= 2:
            interval = ratio_interval(
                [by_prompt["tuned", p] for p in paired], [by_prompt["baseline", p] for p in paired]
            )
            summary["relevance_ratio_interval"] = [round(bound, 4) for bound in interval]
    log.info("evaluate: relevance %s", summary)
    return summary


def _timing(timing: dict[str, float], generator: Path) -> str:
    """How long each model took to answer here, and how long the tuned one took to train."""
    from ray_jobs.train_sft import TRAINING_FILE

    text = "answering: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timing.items())
    try:
        trained = json.loads((generator / TRAINING_FILE).read_text())
        text += f"; the tuned generator's AC-SFT: {trained['steps']} steps in {trained['seconds']:.0f} s"
        if trained.get("resumed_from_step"):
            text += (
                f" (resumed at step {trained['resumed_from_step']}; "
                f"{trained['train_seconds']:.0f} s of training over every run)"
            )
    except (OSError, ValueError, KeyError):
        pass  # trained before the file existed, or not by train_sft
    return text


def _real_setup(
    files: list[Path],
    prompts: list[str],
    config: EvaluateConfig,
    real_counts: dict[str, int],
    defaults: dict[str, int],
) -> dict[str, Any]:
    """The report's and metrics.json's account of the real prompts: files, counts, what was asked."""
    taken = set(prompts)
    per_file = ", ".join(f"{f} ({len(taken.intersection(read_prompt_file(f)))})" for f in files)
    sweeps = ", ".join(f"{a} {n}" for a, n in real_counts.items()) or "none"
    return {
        "prompts": f"{len(prompts)} distinct, taken round robin from {per_file}",
        "relevance prompts": f"{config.real_relevance_prompts}, at the defaults {defaults}",
        "sweeps": sweeps,
        "encoder": config.relevance_encoder,
    }


def _side_by_side(
    records: list[dict[str, Any]], models: list[str], defaults: dict[str, int], count: int
) -> list[dict[str, str]]:
    """The first `count` real prompts with each model's default-attribute answer."""
    answers: dict[int, dict[str, str]] = {}
    for r in records:
        if _is_default(r, defaults):
            row = answers.setdefault(r["prompt_id"], {"prompt": _last_user_text(r["prompt"])})
            row.setdefault(r["model"], str(r["response"]))
    return [
        {"prompt": row["prompt"]} | {m: row.get(m, "") for m in models}
        for _, row in sorted(answers.items())[:count]
    ]


def _model_scores(
    apm: Path | None,
    records: list[dict[str, Any]],
    defaults: dict[str, int],
    encoder: str | None,
    device: str,
    dtype: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records with the APM's predictions (`apm_<attribute>`, the attributes it was trained
    on; with an APM) and relevance (with an encoder), and the relevance summary."""
    if apm is not None:
        model = AttributePredictionModel.from_pretrained(apm, SCHEMA, dtype=getattr(torch, dtype))
        trained = load_trained_attributes(apm, SCHEMA)
        prompts, responses = [r["prompt"] for r in records], [r["response"] for r in records]
        pred = predict(model, model.tokenizer, prompts, responses, device=device)
        for row, values in zip(records, pred, strict=True):
            for name in trained:
                row[f"apm_{name}"] = float(values[SCHEMA.index(name)])
    relevance = _relevance(records, defaults, encoder) if encoder is not None else {}
    return records, relevance


def _mt_bench(
    config: EvaluateConfig,
    models: dict[str, str],
    examples: dict[str, Any],
    out: Path,
    defaults: dict[str, int],
) -> None:
    """FastChat `model_answer` files: both turns of every question, turn 2 after turn 1's answer."""
    questions = per_category(read_mt_bench(resolve_path(config.mt_bench or "")), config.mt_bench_per_category)
    attributes = config.mt_bench_attributes or defaults
    (out / "model_answer").mkdir(parents=True)
    for name, model in models.items():
        histories: list[list[dict[str, str]]] = [[] for _ in questions]
        answers: list[list[str]] = [[] for _ in questions]
        for turn in range(max(len(q["turns"]) for q in questions)):
            requests = [
                {
                    "request_id": i,
                    "attributes": json.dumps(attributes),
                    "turns": json.dumps(histories[i] + [{"role": "User", "text": q["turns"][turn]}]),
                }
                for i, q in enumerate(questions)
                if turn < len(q["turns"])
            ]
            replies = generate_on_ray(model, requests, config, examples, config.mt_bench_max_new_tokens)
            for request in requests:
                i, text = request["request_id"], str(replies[request["request_id"]]["response"])
                histories[i] += [
                    {"role": "User", "text": questions[i]["turns"][turn]},
                    {"role": "Assistant", "text": text},
                ]
                answers[i].append(text)
        model_id = f"helpsteer-{name}"
        lines = [
            json.dumps(
                {
                    "question_id": q["question_id"],
                    "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{q['question_id']}").hex,
                    "model_id": model_id,
                    "choices": [{"index": 0, "turns": answers[i]}],
                    "tstamp": time.time(),
                }
            )
            for i, q in enumerate(questions)
        ]
        (out / "model_answer" / f"{model_id}.jsonl").write_text("\n".join(lines) + "\n")
        log.info("evaluate: MT-Bench answers of %s -> %s", name, out / "model_answer" / f"{model_id}.jsonl")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
