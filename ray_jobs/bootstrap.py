"""SteerLM's bootstrapping round: the tuned generator's own samples, chosen by the APM, train it again.

    python -m ray_jobs.bootstrap --config FILE [key=value ...]
    helpsteer run --config configs/local.yaml --set bootstrap.questions=60   # as a pipeline stage

1. Sample: `questions` everyday questions from the shipped bank (never the evaluation's prompt
   files), `targets_per_question` targets each (the `vary` attributes drawn 0-4, seeded; the rest
   at the `defaults` profile), `candidates` answers per target from the round-1 generator, on a
   Ray Data actor pool. An empty answer is a reject with its reason (`rejects.jsonl`).
2. Score: the relabel stage puts the APM's predictions on every candidate (`scored/`).
3. Choose: per target, the candidate closest to it (Euclidean distance between the APM's scores
   and the target over `vary`), or the one the APM scores highest on `highest_of`
   (`selection: highest`): `chosen/`, a new AC-SFT dataset labelled with the APM's predictions.
4. Round 2: AC-SFT from the round-1 generator on `chosen/` (`sft/`), with the pipeline's `sft:`
   settings, less the rules that need generate_answers' columns (`repeat`, `answer_level`), and
   `sft` here on top (fewer steps, say).
5. Report: both rounds answer `held_out` real-style prompts (`prompt_files`: the evaluation's) at
   seeded targets, the APM scores them, and `report.md` / `report.json` give the mean distance
   |APM - requested| per round, per attribute and overall: how far round 2 moved the measured
   attributes toward the request.

Every step resumes: a finished step's files are kept and skipped on a re-run (relabel continues
its parts, SFT its run); `restart: true` starts over. `out` is refused unless it is absent or this
stage's own output.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from helpsteer_core.answers import pick_questions
from helpsteer_core.apm import load_trained_attributes
from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, STEERLM, LevelScale
from helpsteer_core.bootstrap import (
    Selection,
    Target,
    check_attributes,
    choose,
    draw_targets,
    mean_gaps,
    scored_row,
)
from helpsteer_core.config import (
    ConfigError,
    dump_config,
    merge_sections,
    resolve_path,
    validate_config,
)
from helpsteer_core.generator import read_training_setup
from helpsteer_core.outputs import check_replaceable, mark_output
from helpsteer_core.prompt_files import real_prompts
from helpsteer_core.readers import read_parquet_rows
from ray_jobs import relabel as relabel_stage
from ray_jobs import train_sft as train_sft_stage
from ray_jobs.generation import GenerationSettings, generate_on_ray
from ray_jobs.runtime import ensure_ray, quiet_ray_data, stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.bootstrap")
STAGE = "bootstrap"
SCHEMA = STEERLM
# Round 2 trains on chosen answers, which have no generate_answers columns (style, first_sentences).
ROUND_2_SFT = {"repeat": [], "answer_level": [], "answer_level_at": "whole"}


class BootstrapSettings(GenerationSettings):
    """What to sample and choose; the pipeline profile's `bootstrap:` section."""

    questions: int = Field(60, ge=1)  # from the shipped question bank (helpsteer_core.answers)
    question_seed: int = 1  # which questions: a seeded sample, independent of generate_answers'
    vary: list[str] = ["verbosity", "complexity"]  # drawn 0-4 per target; the rest at `defaults`
    targets_per_question: int = Field(2, ge=1)
    candidates: int = Field(4, ge=1)  # answers per target, the APM picks one
    defaults: Literal["helpsteer", "helpsteer2"] = "helpsteer2"
    selection: Selection = "closest"
    highest_of: str = "helpfulness"  # selection: highest
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    # The report's held-out prompts: the first `held_out` of `prompt_files` (round robin), each at
    # `targets_per_question` seeded targets, one answer per round.
    prompt_files: list[str] = []
    held_out: int = Field(20, ge=1)
    # Round 2's `sft:` keys on top of the pipeline's (nested as in that section), e.g. {max_steps: 100}.
    sft: dict[str, Any] = {}

    def model_post_init(self, _: Any) -> None:
        check_attributes(self.vary, "bootstrap.vary", SCHEMA)
        SCHEMA.index(self.highest_of)


class BootstrapConfig(BootstrapSettings):
    """The bootstrap stage (standalone, or the pipeline's)."""

    generator: str  # the round-1 AC-SFT output folder (train_sft's `out`)
    apm: str  # the APM that scores (train_apm's `out`)
    out: str
    # Round 2's AC-SFT settings before `sft` is applied (the pipeline passes its `sft:` section).
    round_1_sft: dict[str, Any] = {}
    relabel: relabel_stage.RelabelSettings = relabel_stage.RelabelSettings()
    storage: str = "runs/ray_train"  # Ray Train storage for round 2
    restart: bool = False
    tracking: TrackingConfig = TrackingConfig()


def round_2_settings(config: BootstrapConfig, scale: LevelScale) -> train_sft_stage.TrainSFTSettings:
    """Round 1's AC-SFT settings, less what needs generate_answers' columns, with `config.sft` on
    top; apm_quantile levels are placed by round 1's cut points (the chosen rows are few and were
    chosen for their levels: ranking them again would shift what a level means)."""
    fixed = {"quantile_cuts": {name: list(cuts) for name, cuts in scale.cuts.items()}} if scale.cuts else {}
    merged = merge_sections(merge_sections(config.round_1_sft, {**ROUND_2_SFT, **fixed}), config.sft)
    return validate_config(train_sft_stage.TrainSFTSettings, merged, "bootstrap.sft")


def level_scale(generator: Path) -> LevelScale:
    """The round-1 model's levels, on which the APM's scores are compared with the targets."""
    scale = LevelScale.read(generator, SCHEMA)
    if scale is None:
        raise ConfigError(
            f"bootstrap: the model at {generator} learnt levels ranked within each prompt "
            "(sft.quantile_scope: prompt), so no cut points place a new answer's APM scores on its "
            "levels; bootstrap a model trained with quantile_scope: all, or on human or APM labels"
        )
    return scale


def run(config: BootstrapConfig) -> dict[str, Any]:
    started = time.perf_counter()
    out, generator, apm = resolve_path(config.out), resolve_path(config.generator), resolve_path(config.apm)
    check_replaceable(out, STAGE)  # a folder this stage did not write is refused before any work
    trained = load_trained_attributes(apm, SCHEMA)
    untrained = [name for name in (*config.vary, config.highest_of) if name not in trained]
    if untrained and (config.selection == "highest" or set(untrained) & set(config.vary)):
        raise ConfigError(f"bootstrap: the APM at {apm} was not trained on {untrained}; it was on {trained}")
    scale = level_scale(generator)
    settings = round_2_settings(config, scale)
    prompt_files = [resolve_path(f) for f in config.prompt_files]
    held_out = real_prompts(prompt_files, config.held_out) if prompt_files else []
    resolved = config.model_copy(
        update={"out": str(out), "generator": str(generator), "apm": str(apm), "restart": False}
    )
    if config.restart and out.exists():
        shutil.rmtree(out)  # check_replaceable above: this stage's own output
    recorded = out / "config.yaml"
    if recorded.is_file() and recorded.read_text() != dump_config(resolved):
        # Its finished steps would be resumed as if they were this config's.
        raise ConfigError(
            f"{out} holds a bootstrap run of other settings ({recorded}); give another `out`, or "
            "restart=true to start this one over there"
        )
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, STAGE)
    recorded.write_text(dump_config(resolved))
    defaults = dict(DEFAULT_ATTRIBUTES[config.defaults])
    ensure_ray()
    quiet_ray_data()
    with stage_run(STAGE, resolved, config.tracking, SCHEMA) as tracked:
        questions = pick_questions(config.questions, config.question_seed)
        targets = draw_targets(
            questions, config.vary, config.targets_per_question, defaults, config.seed, SCHEMA
        )
        log.info(
            "bootstrap: %d questions x %d targets x %d candidates by %s",
            config.questions,
            config.targets_per_question,
            config.candidates,
            generator,
        )
        sampled = _sample_and_score(
            resolved, str(generator), targets, config.candidates, out / "round-1", scale
        )
        chosen = choose(sampled["rows"], config.vary, config.selection, config.highest_of)
        _write_rows(chosen, out / "chosen" / "part-000000.parquet")
        log.info("bootstrap: %d chosen of %d scored candidates", len(chosen), len(sampled["rows"]))

        round_2 = train_sft_stage.run(
            train_sft_stage.TrainSFTConfig.model_validate(
                {
                    **settings.model_dump(),
                    "generator": str(generator),
                    "data": str(out / "chosen"),
                    "validation": None,
                    "out": str(out / "sft"),
                    "storage": config.storage,
                    "run_name": "sft-round-2",
                    "restart": config.restart,
                    "tracking": config.tracking.model_dump(),
                }
            )
        )
        report: dict[str, Any] = {
            "questions": config.questions,
            "targets": len(targets),
            "candidates": {
                "asked": len(targets) * config.candidates,
                "scored": len(sampled["rows"]),
                "rejected": sampled["rejected"],
            },
            "chosen": len(chosen),
            "selection": config.selection,
            "vary": config.vary,
            # Where the APM's scores were compared with the targets: the round-1 model's levels (its
            # attribute_levels.json cut points, per attribute) or the APM's own 0-4 scale.
            "scale": {name: "levels" if name in scale.cuts else "apm" for name in config.vary},
            # How far the APM's scores of the training rows are from their targets: every candidate
            # against the chosen ones (what the choice bought).
            "training": {
                "candidates": mean_gaps(sampled["rows"], config.vary),
                "chosen": mean_gaps(chosen, config.vary),
            },
            "round_2_sft": {"steps": round_2["steps"], "out": round_2["out"]},
        }
        if held_out:
            probe = draw_targets(
                held_out, config.vary, config.targets_per_question, defaults, config.seed + 1, SCHEMA
            )
            report["held_out"] = {
                "prompts": len(held_out),
                "prompt_files": [str(f) for f in prompt_files],
                "round_1": mean_gaps(
                    _sample_and_score(resolved, str(generator), probe, 1, out / "held-out-round-1", scale)[
                        "rows"
                    ],
                    config.vary,
                ),
                "round_2": mean_gaps(
                    _sample_and_score(resolved, str(out / "sft"), probe, 1, out / "held-out-round-2", scale)[
                        "rows"
                    ],
                    config.vary,
                ),
            }
        report["seconds"] = round(time.perf_counter() - started, 1)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(render_report(report))
        tracked.log_metrics(_flat_metrics(report))
        tracked.log_outputs({"report.md": out / "report.md", "out": out})
    log.info("bootstrap: report in %s", out / "report.md")
    return {"out": str(out), **report}


def _sample_and_score(
    config: BootstrapConfig,
    model: str,
    targets: Sequence[Target],
    candidates: int,
    folder: Path,
    scale: LevelScale,
) -> dict[str, Any]:
    """Answers by `model` to every target, `candidates` each, scored by the APM, with their
    distance to the target on `scale`: {"rows", "rejected"}. Resumes: a folder with `scored/`
    complete is read."""
    done = folder / "sampled.json"
    if not done.is_file():
        requests = [
            {
                "request_id": target.target_id * candidates + candidate,
                "turns": json.dumps([{"role": "User", "text": target.prompt}]),
                "attributes": json.dumps(dict(target.attributes)),
                "order": target.attributes.get("verbosity", 0),  # short answers share batches
            }
            for target in targets
            for candidate in range(candidates)
        ]
        # Prompted as the model was trained (its sft_config.yaml's examples: template, attribute line).
        answers = generate_on_ray(model, requests, config, read_training_setup(model)["examples"])
        rows, rejects = [], []
        for target in targets:
            for candidate in range(candidates):
                answer = answers[target.target_id * candidates + candidate]
                row = {
                    "prompt": target.prompt,
                    "response": str(answer["response"]).strip(),
                    "prompt_id": target.prompt_id,
                    "target_id": target.target_id,
                    "candidate": candidate,
                    "finished": bool(answer["finished"]),
                    "new_tokens": int(answer["new_tokens"]),
                    "answered_by": model,
                    **{f"target_{name}": int(target.attributes[name]) for name in target.drawn},
                }
                if row["response"]:
                    rows.append(row)
                else:
                    rejects.append({**row, "reason": "empty answer"})
        if not rows:
            raise RuntimeError(f"bootstrap: every answer by {model} was empty ({len(rejects)} rejects)")
        _write_rows(rows, folder / "candidates" / "part-000000.parquet")
        (folder / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
        relabel_stage.run(
            relabel_stage.RelabelConfig.model_validate(
                {
                    **config.relabel.model_dump(),
                    "apm": config.apm,
                    "data": str(folder / "candidates"),
                    "out": str(folder / "scored"),
                    "tracking": config.tracking.model_dump(),
                }
            )
        )
        done.write_text(json.dumps({"candidates": len(rows), "rejected": len(rejects)}) + "\n")
    counts = json.loads(done.read_text())
    scored = [scored_row(row, config.vary, scale) for row in read_parquet_rows(folder / "scored")]
    return {"rows": scored, "rejected": counts["rejected"]}


def _write_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    tmp.replace(path)


def render_report(report: dict[str, Any]) -> str:
    vary = report["vary"]
    lines = [
        "# Bootstrapping round",
        "",
        f"{report['questions']} questions, {report['targets']} targets ({', '.join(vary)} drawn 0-4), "
        f"{report['candidates']['asked']} candidates asked, {report['candidates']['scored']} scored, "
        f"{report['candidates']['rejected']} rejected; {report['chosen']} chosen ({report['selection']}); "
        f"round 2: {report['round_2_sft']['steps']} AC-SFT steps.",
        "",
        "Mean |APM - requested| (per attribute) and mean Euclidean distance over "
        f"{', '.join(vary)}; lower is closer to the request. " + _scale_sentence(report.get("scale", {})),
        "",
        f"| rows | n | distance | {' | '.join(vary)} |",
        f"|---|---|---|{'---|' * len(vary)}",
    ]

    def row(label: str, gaps: dict[str, Any]) -> str:
        values = " | ".join(str(gaps["per_attribute"].get(name, "")) for name in vary)
        return f"| {label} | {gaps['rows']} | {gaps['distance']} | {values} |"

    lines.append(row("training: every candidate", report["training"]["candidates"]))
    lines.append(row("training: chosen", report["training"]["chosen"]))
    held = report.get("held_out")
    if held:
        lines.append(row(f"held out ({held['prompts']} prompts): round 1", held["round_1"]))
        lines.append(row(f"held out ({held['prompts']} prompts): round 2", held["round_2"]))
    return "\n".join(lines) + "\n"


def _scale_sentence(scale: dict[str, str]) -> str:
    on_levels = [name for name, where in scale.items() if where == "levels"]
    if not on_levels:
        return "The APM's scores are compared on its own 0-4 scale."
    return (
        f"The APM's {', '.join(on_levels)} scores are first placed on the round-1 model's levels (the "
        "cut points it was trained with, attribute_levels.json), so a level means what it meant in training."
    )


def _flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    metrics = {"chosen": float(report["chosen"]), "candidates_scored": float(report["candidates"]["scored"])}
    for key in ("candidates", "chosen"):
        if report["training"][key]["distance"] is not None:
            metrics[f"training_{key}_distance"] = report["training"][key]["distance"]
    for round_name in ("round_1", "round_2"):
        gaps = report.get("held_out", {}).get(round_name)
        if gaps and gaps["distance"] is not None:
            metrics[f"held_out_{round_name}_distance"] = gaps["distance"]
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.bootstrap", BootstrapConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
