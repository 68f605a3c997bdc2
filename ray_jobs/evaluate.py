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
`mt_bench_attributes` and writes FastChat's `model_answer/<model_id>.jsonl`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field

from helpsteer_core.apm import AttributePredictionModel, load_trained_attributes, predict
from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, HELPSTEER_ATTRIBUTES, STEERLM
from helpsteer_core.config import StrictModel, dump_config, resolve_path
from helpsteer_core.conversation import Turn, parse_prompt_turns
from helpsteer_core.generator import generate_batch, load_steerable, read_training_setup
from helpsteer_core.readers import read_parquet_rows
from helpsteer_core.sft_data import (
    SFTDataConfig,
    generation_prompt_ids,
)
from helpsteer_core.steering import measure, measures_for, render_report, steerability, sweep
from ray_jobs.runtime import ensure_ray, quiet_ray_data, stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.evaluate")
SCHEMA = STEERLM


class EvaluateSettings(StrictModel):
    """How to evaluate; the pipeline profile's `evaluate:` section."""

    prompts: int = Field(20, ge=1)  # distinct held-out prompts per sweep
    # Per-attribute prompt counts that replace `prompts`, e.g. {verbosity: 20} with prompts: 8.
    attribute_prompts: dict[str, int] = {}
    attributes: list[str] = list(HELPSTEER_ATTRIBUTES)  # the attributes swept 0..4
    defaults: Literal["helpsteer", "helpsteer2"] = "helpsteer2"  # the other attributes' values
    max_new_tokens: int = Field(192, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy (deterministic)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(20, ge=1)  # prompts per generate call
    actors: int = Field(1, ge=1)  # generator replicas in the Ray Data actor pool
    cpus_per_actor: int = Field(2, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    # Generation dtype on CPU (GPUs use bfloat16). bfloat16 sampled 1.6x faster than float32 on this
    # project's 2-core AMD EPYC (AVX512-BF16); on a CPU without bf16 instructions keep float32.
    cpu_dtype: Literal["float32", "bfloat16"] = "float32"
    mt_bench: str | None = None  # FastChat question.jsonl, e.g. ../shared/data/mt_bench/question.jsonl
    mt_bench_attributes: dict[str, int] | None = None  # default: the `defaults` profile
    mt_bench_max_new_tokens: int = Field(512, ge=1)
    seed: int = 0


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


class Generator:
    """Ray Data callable class: one model per actor; a batch of requests in, responses out."""

    def __init__(self, model: str, examples: dict[str, Any], max_new_tokens: int, sampling: dict[str, Any]):
        import torch

        torch.set_num_threads(sampling.pop("threads"))
        self.config = SFTDataConfig.model_validate(examples)
        dtype = getattr(torch, sampling.pop("cpu_dtype"))
        self.model, self.tokenizer, self.stop = load_steerable(model, examples, dtype)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [
            generation_prompt_ids(
                [Turn(**t) for t in json.loads(turns)],
                json.loads(attributes),
                self.tokenizer,
                self.config,
                SCHEMA,
                self.max_new_tokens,
            )
            for turns, attributes in zip(batch["turns"], batch["attributes"], strict=True)
        ]
        started = time.perf_counter()
        results = generate_batch(
            self.model, self.tokenizer, prompts, self.max_new_tokens, stop_ids=self.stop, **self.sampling
        )
        seconds = time.perf_counter() - started
        return {
            "request_id": batch["request_id"],
            "response": np.array([r.text for r in results], dtype=object),
            "new_tokens": np.array([r.new_tokens for r in results]),
            "finished": np.array([r.finished for r in results]),
            "batch_seconds": np.full(len(results), seconds),
        }


def _generate(
    model: str,
    requests: list[dict[str, Any]],
    config: EvaluateConfig,
    examples: dict[str, Any],
    max_new_tokens: int,
) -> dict[int, dict[str, Any]]:
    """request_id -> response fields, for every request, generated by `model` on Ray Data."""
    # A batch decodes until its longest answer ends, so requests for the same verbosity batch
    # together (a short answer does not wait on a long one), then prompts of similar length.
    order = sorted(requests, key=lambda r: (json.loads(r["attributes"]).get("verbosity", 0), len(r["turns"])))
    dataset = ray.data.from_items(order).map_batches(
        Generator,
        fn_constructor_kwargs={
            "model": model,
            "examples": examples,
            "max_new_tokens": max_new_tokens,
            "sampling": {
                "temperature": config.temperature,
                "top_p": config.top_p,
                "seed": config.seed,
                "threads": config.cpus_per_actor,
                "cpu_dtype": config.cpu_dtype,
            },
        },
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )
    answers = {int(r["request_id"]): r for r in dataset.take_all()}
    missing = {r["request_id"] for r in requests} - set(answers)
    if missing:
        raise RuntimeError(f"{model}: no response for {len(missing)} requests")
    return answers


def held_out_prompts(data: Path, count: int) -> list[str]:
    """The first `count` distinct prompts of `data`, in file order."""
    prompts: list[str] = []
    for row in read_parquet_rows(data):
        if row["prompt"] not in prompts:
            prompts.append(row["prompt"])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"{data}: {len(prompts)} distinct prompts, fewer than prompts={count}")


def _plot(results: dict[str, dict[str, list[dict[str, Any]]]], out: Path) -> list[Path]:
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
        fig.suptitle(f"{attribute} sweep: mean measure per requested level")
        fig.tight_layout()
        path = out / f"steer_{attribute}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run(config: EvaluateConfig) -> dict[str, Any]:
    generator, data, out = resolve_path(config.generator), resolve_path(config.data), resolve_path(config.out)
    apm = resolve_path(config.apm) if config.apm else None
    setup = read_training_setup(generator)
    if config.mt_bench:
        read_mt_bench(resolve_path(config.mt_bench))  # a bad question file fails before any generation
    for name, value in (config.mt_bench_attributes or {}).items():
        SCHEMA.check_value(name, value)
    examples = setup["examples"]
    baseline = setup["generator"] if config.baseline == "auto" else config.baseline
    models = {"tuned": str(generator)} | ({} if baseline == "none" else {"baseline": baseline})
    defaults = {k: v for k, v in DEFAULT_ATTRIBUTES[config.defaults].items()}
    for name in config.attributes:
        SCHEMA.index(name)  # an unknown attribute is named before anything else is checked
    counts = {a: config.attribute_prompts.get(a, config.prompts) for a in config.attributes}
    for name, count in config.attribute_prompts.items():
        if name not in config.attributes or count < 1:
            raise ValueError(
                f"attribute_prompts: {name}: {count}; allowed: a swept attribute "
                f"({', '.join(config.attributes)}) and a count of at least 1"
            )
    prompts = held_out_prompts(data, max(counts.values()))
    plan = [r for a in config.attributes for r in sweep(counts[a], [a], defaults, SCHEMA)]
    # The all-defaults request of a prompt recurs in every attribute's sweep: generated once.
    unique: dict[tuple[int, str], int] = {}
    for r in plan:
        unique.setdefault((r.prompt_id, json.dumps(r.attributes, sort_keys=True)), len(unique))
    requests = [
        {
            "request_id": i,
            "attributes": attributes,
            "turns": json.dumps([vars(t) for t in parse_prompt_turns(prompts[prompt_id])]),
        }
        for (prompt_id, attributes), i in unique.items()
    ]
    resolved = config.model_copy(
        update={
            "generator": str(generator),
            "data": str(data),
            "out": str(out),
            "apm": str(apm) if apm else None,
        }
    )
    ensure_ray()
    quiet_ray_data()
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with stage_run("evaluate", resolved, config.tracking, SCHEMA) as tracked:
        records: list[dict[str, Any]] = []
        timing = {}
        for name, model in models.items():
            started = time.perf_counter()
            answers = _generate(model, requests, config, examples, config.max_new_tokens)
            timing[name] = time.perf_counter() - started
            log.info("evaluate: %s answered %d requests in %.0f s", name, len(requests), timing[name])
            for r in plan:
                answer = answers[unique[(r.prompt_id, json.dumps(r.attributes, sort_keys=True))]]
                records.append(
                    {
                        "model": name,
                        "prompt_id": r.prompt_id,
                        "attribute": r.attribute,
                        "level": r.level,
                        "attributes": json.dumps(r.attributes),
                        "prompt": prompts[r.prompt_id],
                        "response": answer["response"],
                        "new_tokens": int(answer["new_tokens"]),
                        "finished": bool(answer["finished"]),
                        **measure(answer["response"]),
                    }
                )
        if apm is not None:
            _score(apm, records)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for name in models:
            mine = [r for r in records if r["model"] == name]
            results[name] = {
                attribute: [
                    steerability(mine, attribute, key) for key in measures_for(attribute) if key in mine[0]
                ]
                for attribute in config.attributes
            }
        pq.write_table(pa.Table.from_pylist(records), staging / "responses.parquet")
        report_setup = {
            "generator": str(generator),
            "baseline": baseline,
            "apm": str(apm) if apm else "none",
            "held-out prompts": f"{', '.join(f'{a} {n}' for a, n in counts.items())} from {data}",
            "defaults": f"{config.defaults} {defaults}",
            "decoding": f"temperature {config.temperature}, max_new_tokens {config.max_new_tokens}",
            "responses that ended on their own": ", ".join(
                f"{m} {sum(r['finished'] for r in records if r['model'] == m)}/{len(plan)}" for m in models
            ),
        }
        (staging / "report.md").write_text(render_report(results, report_setup))
        (staging / "metrics.json").write_text(
            json.dumps({"setup": report_setup, "results": results}, indent=2)
        )
        (staging / "evaluate_config.yaml").write_text(dump_config(resolved))
        plots = _plot(results, staging)
        if config.mt_bench:
            _mt_bench(config, models, examples, staging / "mt_bench", defaults)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        summary = _summary(results)
        tracked.log_metrics({"steer": summary, "seconds": timing})
        tracked.log_outputs({"evaluation": out})
    log.info("evaluate: report in %s; %d plots", out / "report.md", len(plots))
    return {"out": str(out), "steerability": summary, "results": results}


def _summary(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> attribute -> {measure: within-prompt rho}."""
    return {
        model: {
            a: {f["measure"]: round(f["within_prompt"], 4) for f in figures} for a, figures in per.items()
        }
        for model, per in results.items()
    }


def _score(apm: Path, records: list[dict[str, Any]]) -> None:
    """Adds the APM's predictions (`apm_<attribute>`) of the attributes it was trained on."""
    model = AttributePredictionModel.from_pretrained(apm, SCHEMA)
    trained = load_trained_attributes(apm, SCHEMA)
    pred = predict(model, model.tokenizer, [r["prompt"] for r in records], [r["response"] for r in records])
    for row, values in zip(records, pred, strict=True):
        for name in trained:
            row[f"apm_{name}"] = float(values[SCHEMA.index(name)])


def read_mt_bench(source: Path) -> list[dict[str, Any]]:
    """FastChat's question.jsonl: one {"question_id", "category", "turns": [str, ...]} per line."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no MT-Bench question file (FastChat's question.jsonl)")
    questions = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            question = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: not JSON ({exc.msg})") from None
        turns = question.get("turns") if isinstance(question, dict) else None
        if "question_id" not in question or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(
                f"{source}:{number}: needs question_id and turns (a list of non-empty strings), "
                "as in FastChat's question.jsonl"
            )
        questions.append(question)
    return questions


def _mt_bench(
    config: EvaluateConfig,
    models: dict[str, str],
    examples: dict[str, Any],
    out: Path,
    defaults: dict[str, int],
) -> None:
    """FastChat `model_answer` files: both turns of every question, turn 2 after turn 1's answer."""
    questions = read_mt_bench(resolve_path(config.mt_bench or ""))
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
            replies = _generate(model, requests, config, examples, config.mt_bench_max_new_tokens)
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
