r"""The SteerLM pipeline as one job, on the embedded default or any reader source.

    helpsteer run --config configs/local.yaml [--from train_sft] [--until evaluate]
    python -m ray_jobs.pipeline --config configs/local.yaml [--from STAGE] [--until STAGE] [key=value ...]
    ray job submit --working-dir . -- \
        python -m ray_jobs.pipeline --config configs/local.yaml runs_dir=/abs/runs

Stages, in order: filter -> train_apm -> generate_answers -> relabel -> train_sft -> evaluate ->
bootstrap (on synthetic data when `data` is not set; bootstrap only with a `bootstrap:` section:
SteerLM's self-improvement round, ray_jobs.bootstrap). With an `answers:` section (the local
profile) the untuned generator writes its own answers to everyday questions in several styles, the
APM labels them (relabel) and AC-SFT trains on them, conditioned on the APM's attributes: SteerLM's
bootstrapping shape, which keeps the model answering as it did. Without it, relabel labels the
filter's training split and generate_answers is off. Each runs as a nested MLflow run under one
parent run. Each stage's output folder is `runs_dir/<stage>-<key>`, where the key hashes the
settings that change the stage's result (not those that only change its speed), the content of what
it reads (data files by their bytes, an earlier stage by its key) and the package version (`_Plan`),
so a changed SFT setting gives train_sft and evaluate new keys and nothing else, and a data file
edited in place reruns everything. A stage whose output is complete (its record in
`runs_dir/.pipeline/`) is skipped and says so; one that reruns says which inputs changed.
`runs_dir/filtered`, `apm`, `relabelled`, `sft` and `eval` link to the current outputs. `--from`
starts at a stage (the earlier ones must be complete), `--until` stops after one, and `force=true`
reruns the stages in that range from scratch: training from step 1 (the old run moved aside, kept),
relabel predicting every part. A summary table closes the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import mlflow
from pydantic import Field, field_validator
from rich.console import Console
from rich.table import Table

from helpsteer_core.compare import write_comparison
from helpsteer_core.config import ConfigError, StrictModel, merge_sections, resolve_path, validate_config
from helpsteer_core.conversation_sources import SOURCE_COLUMN, DataSource, check_source_names
from helpsteer_core.fingerprints import (
    code_version,
    model_fingerprint,
    result_settings,
    settings_key,
    source_fingerprint,
    without_off,
)
from helpsteer_core.outputs import TRAINING_SPEED_ONLY
from helpsteer_core.prompt_files import read_prompt_file
from helpsteer_core.sft_data import RowRepeat
from helpsteer_core.synthetic import GENERATOR_VERSION, write_synthetic
from helpsteer_core.synthetic_oasst import GENERATOR_VERSION as OASST_GENERATOR_VERSION
from helpsteer_core.synthetic_oasst import write_synthetic_oasst
from ray_jobs import bootstrap as bootstrap_stage
from ray_jobs import evaluate as evaluate_stage
from ray_jobs import filter_data
from ray_jobs import generate_answers as answers_stage
from ray_jobs import relabel as relabel_stage
from ray_jobs import train_apm as train_apm_stage
from ray_jobs import train_sft as train_sft_stage
from ray_jobs.console import console_out, log_file
from ray_jobs.generation import SPEED_ONLY as GENERATION_SPEED_ONLY
from ray_jobs.runtime import stage_main
from ray_jobs.tracking import TrackingConfig, TrackingSettings, stage_run

log = logging.getLogger("helpsteer.pipeline")
STAGES = ("filter", "train_apm", "generate_answers", "relabel", "train_sft", "evaluate", "bootstrap")
Stage = Literal["filter", "train_apm", "generate_answers", "relabel", "train_sft", "evaluate", "bootstrap"]
EARLY = ("filter", "train_apm", "generate_answers", "relabel")  # a variant shares these
LATE = ("train_sft", "evaluate", "bootstrap")  # keyed once relabel's output is complete
RECORDS = ".pipeline"
# runs_dir/<link> -> the current output of each stage (the paths the stage configs default to).
LINKS = {
    "filter": "filtered",
    "train_apm": "apm",
    "generate_answers": "answers",
    "relabel": "relabelled",
    "train_sft": "sft",
    "evaluate": "eval",
    "bootstrap": "bootstrapped",
}


class SyntheticConfig(StrictModel):
    """The built-in synthetic sources: HelpSteer-style rows (used when `data` is not set, or where
    a source's path is `builtin:synthetic`) and OpenAssistant-format trees (`builtin:synthetic-oasst`)."""

    rows: int = Field(2000, ge=1)
    seed: int = 1
    oasst_trees: int = Field(300, ge=1)  # trees of helpsteer_core.synthetic_oasst, planted labels


class Variant(StrictModel):
    """An AC-SFT variant of the main run (an ablation): it shares every stage before train_sft, and
    its own train_sft and evaluate run after the main ones."""

    # Letters, digits, '-', '_', '.': it names the variant's rows, MLflow tags and compare's runs.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # The `sft:` keys it changes, nested as in that section, e.g. {examples: {condition_on: [...]}}.
    sft: dict[str, Any] = Field(min_length=1)


class PipelineConfig(StrictModel):
    """The whole pipeline. Every output goes under `runs_dir`."""

    runs_dir: str = "runs"
    # A reader source; None means the synthetic source. Or several sources, each with its own
    # reader settings and role (helpsteer_core.conversation_sources.DataSource): `apm` (its labels
    # train the APM; its validation rows score it, per source), `sft` (human: AC-SFT on its own
    # labels; apm / apm_quantile: on the APM's after relabel; none), `repeat`. `path: builtin:synthetic`
    # and `builtin:synthetic-oasst` are the built-in synthetic sources (`synthetic:`).
    data: str | list[DataSource] | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    filter: filter_data.FilterSettings = filter_data.FilterSettings()
    apm: train_apm_stage.TrainAPMSettings = train_apm_stage.TrainAPMSettings()
    # The untuned generator's own answers as AC-SFT's data (null: AC-SFT trains on the filter's rows).
    answers: answers_stage.AnswersSettings | None = None
    relabel: relabel_stage.RelabelSettings = relabel_stage.RelabelSettings()
    sft: train_sft_stage.TrainSFTSettings = train_sft_stage.TrainSFTSettings()
    evaluate: evaluate_stage.EvaluateSettings = evaluate_stage.EvaluateSettings()
    # Ablations: each trains and evaluates its own generator; `helpsteer compare` of the main
    # evaluation and theirs is written to runs_dir/compare.
    variants: list[Variant] = []
    # SteerLM's bootstrapping round after evaluate (ray_jobs.bootstrap): the tuned generator's own
    # answers, chosen by the APM, train a second AC-SFT round; null (the default) leaves it off.
    bootstrap: bootstrap_stage.BootstrapSettings | None = None
    experiment: str = "helpsteer"

    # MLflow: null tracking_uri is runs_dir/mlflow.db; a cluster sets http://HEAD:5000.
    tracking: TrackingSettings = TrackingSettings()
    from_stage: Stage = "filter"  # --from: earlier stages must already be complete
    until_stage: Stage = "bootstrap"  # --until: the last stage to run
    force: bool = False  # rerun stages in range even when their output is complete

    @field_validator("data")
    @classmethod
    def _sources(cls, data: str | list[DataSource] | None) -> str | list[DataSource] | None:
        return data if data is None or isinstance(data, str) else check_source_names(data)

    def model_post_init(self, _: Any) -> None:
        if not isinstance(self.data, list):
            return
        trained = [s.name for s in self.data if s.sft != "none"]
        if self.answers is not None and trained:
            raise ConfigError(
                f"data: sources {trained} have sft set, but with an `answers:` section AC-SFT trains on "
                "the generated answers; give them sft: none (they still train the APM)"
            )
        if self.answers is None and not trained:
            raise ConfigError(
                "data: no source has sft: human, apm or apm_quantile; AC-SFT would have no rows"
            )
        if not any(s.apm for s in self.data):
            raise ConfigError("data: no source has apm: true; the APM would have no rows to learn from")

    @field_validator("variants")
    @classmethod
    def _distinct_names(cls, variants: list[Variant]) -> list[Variant]:
        names = [v.name for v in variants]
        if len(set(names)) < len(names) or "main" in names:
            raise ValueError(f"variant names {names} must differ from each other and from 'main'")
        return variants


class _Plan:
    """Where each stage's output goes: `runs/<stage>-<key>`, the key a hash of the stage's inputs.

    A stage's inputs (kept in `.pipeline/<stage>-<key>.inputs.json` to say what changed when it
    reruns) are: the settings that change its result (each stage module's SPEED_ONLY fields and the
    training stages' TRAINING_SPEED_ONLY are left out), the content of what it reads (a data
    source by content digest or datasets' fingerprint, a model folder by its files, an earlier
    stage by that stage's key), and the package version. train_sft's key covers what its examples
    are built from (prompt, response, the attributes chosen for each row, read from relabel's
    output), so an APM change whose labels SFT does not use reruns no SFT; it, and evaluate's, are
    known once relabel's output is.
    """

    def __init__(
        self, config: PipelineConfig, runs: Path, data: Data | None, shared: _Plan | None = None
    ) -> None:
        """`shared`: the main run's plan, whose stages before train_sft a variant's plan takes as
        they are (its sft changes may touch what those keys read, e.g. the examples the untuned
        generator was prompted with, but a variant trains on the main run's relabelled rows)."""
        self.config, self.runs = config, runs
        self.answers = config.answers is not None
        self.inputs: dict[str, dict[str, Any]] = {}
        if shared is not None:
            self.inputs = {stage: shared.inputs[stage] for stage in EARLY if stage in shared.inputs}
            return
        assert data is not None, "a plan of its own needs the data it filters"
        code = code_version()
        self.inputs["filter"] = {
            "data": _data_fingerprint(data, config.filter.hf_split),
            "settings": result_settings(config.filter, filter_data.SPEED_ONLY),
            "code": code,
        }
        self.inputs["train_apm"] = {
            "filter": self.key("filter"),
            "settings": result_settings(apm_settings(config), TRAINING_SPEED_ONLY),
            "backbone": model_fingerprint(config.apm.apm.backbone),
            "code": code,
        }
        if config.answers is not None:
            self.inputs["generate_answers"] = {
                "settings": result_settings(config.answers, GENERATION_SPEED_ONLY),
                "generator": model_fingerprint(config.sft.generator),
                # The untuned generator is asked with no attribute line: how its levels would be
                # said (level_words) never reaches its prompts.
                "examples": config.sft.examples.model_dump(mode="json", exclude={"level_words"}),
                "code": code,
            }
        relabelled = "generate_answers" if self.answers else "filter"
        self.inputs["relabel"] = {
            "apm": self.key("train_apm"),
            relabelled: self.key(relabelled),
            "settings": result_settings(relabel_settings(config), relabel_stage.SPEED_ONLY),
            "code": code,
        }

    def _late_inputs(self, stage: str) -> dict[str, Any] | None:
        """train_sft's and evaluate's inputs, once relabel's output is complete (else None)."""
        config, code = self.config, code_version()
        if stage == "train_sft":
            if self.complete("relabel") is None:
                return None
            sft = sft_settings(config)
            return {
                "examples": train_sft_stage.examples_fingerprint(sft, self.out("relabel")),
                "validation": None if self.answers or isinstance(config.data, list) else self.key("filter"),
                "settings": train_sft_stage.identity_settings(sft, TRAINING_SPEED_ONLY),
                "generator": model_fingerprint(config.sft.generator),
                "code": code,
            }
        sft = self.key("train_sft")
        if sft is None:
            return None
        if stage == "bootstrap":
            if config.bootstrap is None:
                return None  # off: used() is false, and it has no key
            files = _bootstrap_prompt_files(config)
            return {
                "sft": sft,
                "apm": self.key("train_apm"),
                "settings": result_settings(config.bootstrap, GENERATION_SPEED_ONLY),
                "prompt_files": {name: source_fingerprint(name) for name in files},
                "round_1_sft": train_sft_stage.identity_settings(config.sft, TRAINING_SPEED_ONLY),
                "relabel": result_settings(config.relabel, relabel_stage.SPEED_ONLY),
                "code": code,
            }
        prompt_files = [*config.evaluate.real_prompts, *filter(None, [config.evaluate.mt_bench])]
        return {
            "sft": sft,
            "apm": self.key("train_apm"),
            "filter": self.key("filter"),  # the validation split it measures on
            "prompt_files": {name: source_fingerprint(name) for name in prompt_files},
            # The judge's settings change no generated answer (and judging resumes in place).
            "settings": without_off(
                result_settings(config.evaluate, (*GENERATION_SPEED_ONLY, "judge")),
                {"mt_bench_per_category": None},
            ),
            "code": code,
        }

    def used(self, stage: str) -> bool:
        if stage == "bootstrap":
            return self.config.bootstrap is not None
        return stage != "generate_answers" or self.answers

    def key(self, stage: str) -> str | None:
        """The stage's key; None for train_sft and evaluate until relabel's output is complete."""
        if stage not in self.inputs:
            late = self._late_inputs(stage) if stage in LATE else None
            if late is None:
                return None
            self.inputs[stage] = late
        return settings_key(self.inputs[stage])

    def out(self, stage: str) -> Path:
        if not self.used(stage):
            raise ConfigError(f"{stage}: off in this config (no output folder)")
        key = self.key(stage)
        if key is None:
            raise ConfigError(f"{stage}: its inputs are not complete yet (run relabel first)")
        return self.runs / f"{stage}-{key}"

    def record(self, stage: str) -> Path:
        return self.runs / RECORDS / f"{self.out(stage).name}.json"

    def complete(self, stage: str) -> dict[str, Any] | None:
        if self.key(stage) is None:
            return None
        record = self.record(stage)
        if record.is_file() and self.out(stage).exists():
            return dict(json.loads(record.read_text()))
        return None

    def changed(self, stage: str) -> list[str]:
        """Which inputs differ from those of the stage's current output (runs/<link>), if any."""
        link = self.runs / LINKS[stage]
        try:
            before = json.loads((self.runs / RECORDS / f"{link.readlink().name}.inputs.json").read_text())
        except (OSError, ValueError):
            return []
        return _differences(before, self.inputs.get(stage, {}))

    def finish(self, stage: str, summary: dict[str, Any], link: bool = True) -> None:
        """Record the stage's summary and inputs; `link`: point runs/<link> at its output."""
        record = self.record(stage)
        record.parent.mkdir(parents=True, exist_ok=True)
        inputs = json.dumps(self.inputs[stage], indent=2, sort_keys=True, default=str)
        record.with_suffix(".inputs.json").write_text(inputs + "\n")
        record.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if link:
            self.link(stage)

    def link(self, stage: str) -> None:
        """Point runs/<link> at this config's output of `stage` (also when it was complete already:
        a config set back to earlier settings finds their outputs and links them again)."""
        link_path = self.runs / LINKS[stage]
        if link_path.is_symlink() or not link_path.exists():  # never replaces a real folder
            tmp = self.runs / f".{LINKS[stage]}.link"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.out(stage).name)
            os.replace(tmp, link_path)


def _differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two inputs records ("settings.lr", "data")."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for name in sorted(set(before) | set(after)):
            found += _differences(before.get(name), after.get(name), f"{prefix}{name}.")
        return found
    return [] if before == after else [prefix.rstrip(".")]


def _synthetic_source(config: PipelineConfig, runs: Path) -> str:
    rows, seed = config.synthetic.rows, config.synthetic.seed
    folder = runs / "data" / f"synthetic-v{GENERATOR_VERSION}-rows{rows}-seed{seed}"
    if not (folder / "manifest.json").is_file():
        files = write_synthetic(folder, rows=rows, seed=seed)
        log.info("synthetic: %d rows in %d file(s) -> %s", rows, len(files), folder)
    return str(folder)


def _synthetic_oasst_source(config: PipelineConfig, runs: Path) -> str:
    trees, seed = config.synthetic.oasst_trees, config.synthetic.seed
    folder = runs / "data" / f"synthetic-oasst-v{OASST_GENERATOR_VERSION}-trees{trees}-seed{seed}"
    if not (folder / "manifest.json").is_file():
        path = write_synthetic_oasst(folder, trees=trees, seed=seed)
        log.info("synthetic-oasst: %d trees -> %s", trees, path)
    return str(folder)


Data = str | list[DataSource]  # what the filter stage reads: one source, or several named ones
# DataSource paths naming the built-in synthetic sources, written under runs_dir/data on first use.
BUILTIN_SOURCES = {"builtin:synthetic": _synthetic_source, "builtin:synthetic-oasst": _synthetic_oasst_source}


def _data(config: PipelineConfig, runs: Path) -> Data:
    """The filter stage's `data`: the profile's, with the built-in sources written where named."""
    if config.data is None:
        return _synthetic_source(config, runs)
    if isinstance(config.data, str):
        return config.data
    builtin = {
        s.path: BUILTIN_SOURCES[s.path](config, runs) for s in config.data if s.path in BUILTIN_SOURCES
    }
    return [s.model_copy(update={"path": builtin[s.path]}) if s.path in builtin else s for s in config.data]


def _data_fingerprint(data: Data, hf_split: str) -> Any:
    """What the filter reads: a source's content, or each named source's content and reader settings."""
    if isinstance(data, str):
        return source_fingerprint(data, hf_split)
    reading = ("name", "input_format", "hf_split", "oasst")  # not apm / sft / repeat: later stages'
    return [
        s.model_dump(mode="json", include=set(reading)) | {"content": source_fingerprint(s.path, s.hf_split)}
        for s in data
    ]


def apm_settings(config: PipelineConfig) -> train_apm_stage.TrainAPMSettings:
    """The APM's settings; with several sources, it trains on those with `apm: true`."""
    if not isinstance(config.data, list):
        return config.apm
    return config.apm.model_copy(update={"sources": [s.name for s in config.data if s.apm]})


def relabel_settings(config: PipelineConfig) -> relabel_stage.RelabelSettings:
    """Relabel's settings; with several sources (and no answers), it labels those AC-SFT trains on."""
    if not isinstance(config.data, list) or config.answers is not None:
        return config.relabel
    return config.relabel.model_copy(update={"sources": [s.name for s in config.data if s.sft != "none"]})


def sft_settings(config: PipelineConfig) -> train_sft_stage.TrainSFTSettings:
    """AC-SFT's settings; with several sources (and no answers), each source's rows take its `sft`
    as their attribute source and appear `repeat` times an epoch (rules before the profile's)."""
    if not isinstance(config.data, list) or config.answers is not None:
        return config.sft
    trained = [s for s in config.data if s.sft != "none"]
    repeats = [RowRepeat(where={SOURCE_COLUMN: [s.name]}, times=s.repeat) for s in trained if s.repeat > 1]
    return config.sft.model_copy(
        update={
            "attribute_source": {s.name: s.sft for s in trained},
            "repeat": [*repeats, *config.sft.repeat],
        }
    )


def stage_tracking(config: PipelineConfig, runs: Path) -> TrackingConfig:
    """The tracking settings every stage of the pipeline gets (runs in `runs` unless a server)."""
    return TrackingConfig(runs_dir=str(runs), experiment=config.experiment, **config.tracking.model_dump())


def run(config: PipelineConfig, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the stages in range; `on_stage(name)` is called as each stage starts (bench/pipeline.py)."""
    runs = resolve_path(config.runs_dir)
    first, last = STAGES.index(config.from_stage), STAGES.index(config.until_stage)
    if first > last:
        raise ConfigError(
            f"--from {config.from_stage} comes after --until {config.until_stage}; order: {STAGES}"
        )
    if last >= STAGES.index("evaluate"):
        for name in config.evaluate.real_prompts:  # a missing prompt file fails now, not after training
            read_prompt_file(resolve_path(name))
    tracking = stage_tracking(config, runs)
    data = _data(config, runs)
    plan = _Plan(config, runs, data)
    for stage in STAGES[:first]:
        if plan.used(stage) and plan.complete(stage) is None:
            raise ConfigError(
                f"--from {config.from_stage}: the earlier stage {stage} has no complete output for this "
                "config "
                f"({plan.out(stage)}); run from {stage} or earlier"
            )
    stages: dict[str, Callable[[], dict[str, Any]]] = {
        "filter": lambda: _filter(config, plan, data, tracking),
        "train_apm": lambda: _train_apm(config, plan, tracking),
        "generate_answers": lambda: _generate_answers(config, plan, tracking),
        "relabel": lambda: _relabel(config, plan, tracking),
        "train_sft": lambda: _train_sft(config, plan, tracking),
        "evaluate": lambda: _evaluate(config, plan, tracking),
        "bootstrap": lambda: _bootstrap(config, plan, tracking),
    }
    summary: dict[str, Any] = {}
    status: dict[str, str] = {}
    with stage_run("pipeline", config, tracking):
        for index, stage in enumerate(STAGES):
            if not plan.used(stage):
                status[stage] = "off"
                continue
            if index < first or index > last:
                if (done := plan.complete(stage)) is not None:
                    summary[stage], status[stage] = done, "earlier run"
                continue
            summary[stage], status[stage] = _step(stage, plan, stages[stage], config.force, on_stage)
        outputs = {stage: plan.out(stage) for stage in summary}
        if config.variants and last >= STAGES.index("evaluate"):
            outputs |= _variants(config, plan, tracking, summary, status)
        mlflow.log_dict(summary, "pipeline_summary.json")
    _print_summary(summary, status, outputs, plan.runs)
    return summary


def _step(
    stage: str,
    plan: _Plan,
    call: Callable[[], dict[str, Any]],
    force: bool,
    on_stage: Callable[[str], None] | None = None,
    variant: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Run one stage into `plan.out(stage)` unless its output is complete: (summary, status).
    A variant's outputs are recorded but the runs/<link> names keep pointing at the main run's."""
    label = stage if variant is None else f"{stage} [{variant}]"
    metric = stage if variant is None else f"{stage}.{variant}"
    done = plan.complete(stage)
    if done is not None and not force:
        log.info("pipeline: %s is complete for this config (%s); skipped", label, plan.out(stage))
        mlflow.set_tag(f"skipped.{metric}", str(plan.out(stage)))
        if variant is None:
            plan.link(stage)
        return done, "skipped (complete)"
    changed = plan.changed(stage) if variant is None else []
    because = f" (changed: {', '.join(changed)})" if changed else ""
    log.info("pipeline: running %s -> %s%s", label, plan.out(stage), because)
    if on_stage is not None:
        on_stage(label)
    started = time.perf_counter()
    summary = call() | {"wall_s": round(time.perf_counter() - started, 1)}
    mlflow.log_metric(f"wall_s.{metric}", summary["wall_s"])
    plan.finish(stage, summary, link=variant is None)
    return summary, f"ran{because}"


def variant_plan(config: PipelineConfig, index: int, plan: _Plan) -> tuple[PipelineConfig, _Plan]:
    """`config.variants[index]`'s config and plan: every stage before train_sft is `plan`'s."""
    own = variant_config(config, index)
    return own, _Plan(own, plan.runs, None, shared=plan)


def variant_config(config: PipelineConfig, index: int) -> PipelineConfig:
    """The pipeline config of `config.variants[index]`: its sft changes applied, no variants."""
    variant = config.variants[index]
    sft = validate_config(
        train_sft_stage.TrainSFTSettings,
        merge_sections(config.sft.model_dump(mode="json"), variant.sft),
        f"variants[{index}] ({variant.name}): sft",
    )
    return config.model_copy(update={"sft": sft, "variants": []})


def _variants(
    config: PipelineConfig,
    plan: _Plan,
    tracking: TrackingConfig,
    summary: dict[str, Any],
    status: dict[str, str],
) -> dict[str, Path]:
    """Each variant's train_sft and evaluate (every earlier stage is the main run's: same keys),
    then `helpsteer compare` of the main evaluation and theirs into runs_dir/compare."""
    outputs: dict[str, Path] = {}
    evaluations = [plan.out("evaluate")]
    for index, variant in enumerate(config.variants):
        own, own_plan = variant_plan(config, index, plan)
        for stage, run_stage in (("train_sft", _train_sft), ("evaluate", _evaluate)):
            label = f"{stage} [{variant.name}]"
            call = partial(run_stage, own, own_plan, tracking)
            summary[label], status[label] = _step(stage, own_plan, call, config.force, variant=variant.name)
            outputs[label] = own_plan.out(stage)
        evaluations.append(own_plan.out("evaluate"))
    names = ["main", *(v.name for v in config.variants)]
    write_comparison(evaluations, plan.runs / "compare", names)
    summary["compare"] = {"out": str(plan.runs / "compare"), "runs": names}
    status["compare"] = "written"
    outputs["compare"] = plan.runs / "compare" / "compare.md"
    log.info("pipeline: main and %d variant(s) compared in %s", len(config.variants), outputs["compare"])
    return outputs


def _filter(config: PipelineConfig, plan: _Plan, data: Data, tracking: TrackingConfig) -> dict[str, Any]:
    stage_config = filter_data.FilterStageConfig.model_validate(
        {
            **config.filter.model_dump(),
            "data": data if isinstance(data, str) else [s.model_dump() for s in data],
            "out": str(plan.out("filter")),
            "tracking": tracking.model_dump(),
        }
    )
    return filter_data.run(stage_config)


def _train_apm(config: PipelineConfig, plan: _Plan, tracking: TrackingConfig) -> dict[str, Any]:
    stage_config = train_apm_stage.TrainAPMConfig.model_validate(
        {
            **apm_settings(config).model_dump(),
            "data": str(plan.out("filter")),
            "out": str(plan.out("train_apm")),
            "storage": str(plan.runs / "ray_train"),
            # The stage keys its run by identity: an interrupted pipeline resumes its own run, a
            # larger apm.max_steps continues it, and force starts it over (the old run kept aside).
            "run_name": "apm",
            "restart": config.force,
            "tracking": tracking.model_dump(),
        }
    )
    return train_apm_stage.run(stage_config)


def _generate_answers(config: PipelineConfig, plan: _Plan, tracking: TrackingConfig) -> dict[str, Any]:
    assert config.answers is not None  # the stage is off without an `answers:` section
    stage_config = answers_stage.AnswersConfig.model_validate(
        {
            **config.answers.model_dump(),
            "generator": config.sft.generator,
            "examples": config.sft.examples.model_dump(),
            "out": str(plan.out("generate_answers")),
            "tracking": tracking.model_dump(),
        }
    )
    return answers_stage.run(stage_config)


def _relabel(config: PipelineConfig, plan: _Plan, tracking: TrackingConfig) -> dict[str, Any]:
    # The generator's own answers (or the filter's training split) get the APM's attributes, beside
    # any human ones, for AC-SFT.
    data = plan.out("generate_answers") / answers_stage.KEPT if plan.answers else plan.out("filter") / "train"
    stage_config = relabel_stage.RelabelConfig.model_validate(
        {
            **relabel_settings(config).model_dump(),
            "apm": str(plan.out("train_apm")),
            "data": str(data),
            "out": str(plan.out("relabel")),
            "restart": config.force,  # force re-predicts every part, not only the missing ones
            "tracking": tracking.model_dump(),
        }
    )
    return relabel_stage.run(stage_config)


def _train_sft(config: PipelineConfig, plan: _Plan, tracking: TrackingConfig) -> dict[str, Any]:
    several = isinstance(config.data, list)
    stage_config = train_sft_stage.TrainSFTConfig.model_validate(
        {
            **sft_settings(config).model_dump(),
            "data": str(plan.out("relabel")),
            # The filter's validation rows carry human labels of the synthetic set, not the answers'
            # APM labels: with self-written answers there is no validation loss (evaluate measures).
            # Several sources: their validation rows are not relabelled, so neither (the APM's
            # report scores each source's validation rows).
            "validation": None if plan.answers or several else str(plan.out("filter") / "validation"),
            "out": str(plan.out("train_sft")),
            "storage": str(plan.runs / "ray_train"),
            "run_name": "sft",
            "restart": config.force,
            "tracking": tracking.model_dump(),
        }
    )
    return train_sft_stage.run(stage_config)


def _evaluate(config: PipelineConfig, plan: _Plan, tracking: TrackingConfig) -> dict[str, Any]:
    stage_config = evaluate_stage.EvaluateConfig.model_validate(
        {
            **config.evaluate.model_dump(),
            "generator": str(plan.out("train_sft")),
            "apm": str(plan.out("train_apm")),
            "data": str(plan.out("filter") / "validation"),
            "out": str(plan.out("evaluate")),
            "tracking": tracking.model_dump(),
        }
    )
    result = evaluate_stage.run(stage_config)
    keep = ("out", "steerability", "real_steerability", "relevance")
    return {key: result[key] for key in keep}


def _bootstrap_prompt_files(config: PipelineConfig) -> list[str]:
    """The report's held-out prompts: the bootstrap section's files, else the evaluation's."""
    assert config.bootstrap is not None
    return config.bootstrap.prompt_files or config.evaluate.real_prompts


def _bootstrap(config: PipelineConfig, plan: _Plan, tracking: TrackingConfig) -> dict[str, Any]:
    assert config.bootstrap is not None  # the stage is off without a `bootstrap:` section
    stage_config = bootstrap_stage.BootstrapConfig.model_validate(
        {
            **config.bootstrap.model_dump(),
            "prompt_files": _bootstrap_prompt_files(config),
            "generator": str(plan.out("train_sft")),
            "apm": str(plan.out("train_apm")),
            "out": str(plan.out("bootstrap")),
            "round_1_sft": config.sft.model_dump(mode="json"),
            "relabel": config.relabel.model_dump(),
            "storage": str(plan.runs / "ray_train"),
            "restart": config.force,
            "tracking": tracking.model_dump(),
        }
    )
    result = bootstrap_stage.run(stage_config)
    keep = ("out", "chosen", "training", "held_out", "round_2_sft")
    return {key: result[key] for key in keep if key in result}


def _print_summary(
    summary: dict[str, Any], status: dict[str, str], outputs: dict[str, Path], runs: Path
) -> None:
    table = Table(title="helpsteer pipeline")
    for column in ("stage", "status", "time", "result", "output"):
        table.add_column(column)
    extra = [label for label in summary if label not in STAGES]  # variants, then the comparison
    for label in [*STAGES, *extra]:
        if label not in summary:
            table.add_row(label, status.get(label, "not run"), "", "", "")
            continue
        stage = label.split(" [")[0]
        wall = summary[label].get("wall_s")
        ran = status[label].startswith("ran")
        took = "" if wall is None else f"{wall:.0f} s" if ran else f"(ran in {wall:.0f} s)"
        result = _result(stage, summary[label]) if stage in STAGES else ", ".join(summary[label]["runs"])
        table.add_row(label, status[label], took, result, str(outputs[label]))
    console = Console(file=console_out())  # the terminal, also while Ray's output goes to the log
    console.print(table)
    console.print(f"MLflow: helpsteer ui --runs-dir {runs}")
    if log_file() is not None:
        console.print(f"Ray's and the libraries' output: {log_file()}", soft_wrap=True)


def _result(stage: str, result: dict[str, Any]) -> str:
    if stage == "filter":
        t = result["total"]
        return (
            f"{t['input_rows']} rows: kept {t['kept']} (train {t['train']}, validation {t['validation']}), "
            f"filtered {t['filtered']}, rejected {t['rejected']}"
        )
    if stage == "train_apm":
        attributes = result["attributes"]
        pearson = ", ".join(
            f"{n} {m['pearson']:.2f}" if m["pearson"] is not None else f"{n} n/a"
            for n, m in attributes.items()
        )
        beats = sum(bool(m["beats_baseline_rmse"]) for m in attributes.values())
        return f"validation Pearson: {pearson}; RMSE beats the mean on {beats}/{len(attributes)}"
    if stage == "generate_answers":
        return (
            f"{result['requested']} answers: kept {result['kept']}, rejected {result['rejected']}, "
            f"+{result.get('shorter_versions', 0)} shorter versions; "
            f"{result['new_tokens_per_second']} new tokens/s"
        )
    if stage == "relabel":
        rejected = f", {result['rejected_rows']} rejected" if result.get("rejected_rows") else ""
        return f"{result['output_rows']} rows{rejected}, {result['rows_per_second']} rows/s"
    if stage == "bootstrap":
        held = result.get("held_out") or {}
        moved = ""
        if held:
            before, after = held["round_1"]["distance"], held["round_2"]["distance"]
            moved = f"; held-out distance to the request: round 1 {before} -> round 2 {after}"
        return f"{result['chosen']} chosen answers, {result['round_2_sft']['steps']} round-2 steps{moved}"
    if stage == "train_sft":
        final = result.get("final", {})
        loss = f"loss {final['loss']:.3f}" if "loss" in final else ""
        val = f", validation loss {final['val_loss']:.3f}" if "val_loss" in final else ""
        return f"{result['steps']} steps x {result['global_batch_rows']} rows; {loss}{val}"
    lines = []
    for model, per in result["steerability"].items():
        figures = ", ".join(f"{a} {next(iter(m.values())):.2f}" for a, m in per.items())
        lines.append(f"{model}: {figures}")
    text = "Spearman (within prompt) " + "; ".join(lines)
    # Runs recorded before real-style prompts existed have neither key; runs without them, empty ones.
    real, relevance = result.get("real_steerability") or {}, result.get("relevance") or {}
    parts = []
    if real.get("tuned"):
        parts.append(
            "tuned " + ", ".join(f"{a} {next(iter(m.values())):.2f}" for a, m in real["tuned"].items())
        )
    if "tuned" in relevance:
        against = (
            f" / untuned {relevance['baseline']['mean_cosine']:.2f}" if "baseline" in relevance else ""
        ) + (
            f" ({relevance['relevance_ratio']:.2f}x{_interval(relevance)})"
            if "relevance_ratio" in relevance
            else ""
        )
        parts.append(f"relevance tuned {relevance['tuned']['mean_cosine']:.2f}{against}")
    return text + (f"; real prompts: {'; '.join(parts)}" if parts else "")


def _interval(relevance: dict[str, Any]) -> str:
    """`, 95% 0.70-0.93`: the ratio's interval over the prompts, when the evaluation has one."""
    interval = relevance.get("relevance_ratio_interval")
    return f", 95% {interval[0]:.2f}-{interval[1]:.2f}" if interval else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--from", dest="from_stage", choices=STAGES)
    parser.add_argument("--until", dest="until_stage", choices=STAGES)
    known, rest = parser.parse_known_args(argv)
    extra = [f"{k}={v}" for k, v in vars(known).items() if v is not None]
    return stage_main(__doc__, "python -m ray_jobs.pipeline", PipelineConfig, run, [*rest, *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
