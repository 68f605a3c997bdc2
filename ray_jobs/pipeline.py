r"""The SteerLM pipeline as one job, on the embedded default or any reader source.

    helpsteer run --config configs/local.yaml
    python -m ray_jobs.pipeline --config configs/local.yaml [key=value ...]
    ray job submit --working-dir . -- \
        python -m ray_jobs.pipeline --config configs/local.yaml runs_dir=/abs/runs

Stages so far: synthetic data (when no `data` is given) -> filter -> train-apm -> relabel.
Each stage runs as a nested MLflow run under one parent run; a summary table closes the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from pydantic import Field
from rich.console import Console
from rich.table import Table

from helpsteer_core.config import StrictModel, resolve_path
from helpsteer_core.synthetic import write_synthetic
from ray_jobs import filter_data
from ray_jobs import relabel as relabel_stage
from ray_jobs import train_apm as train_apm_stage
from ray_jobs.runtime import stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.pipeline")


class SyntheticConfig(StrictModel):
    """The built-in synthetic source (used when `data` is not set)."""

    rows: int = Field(2000, ge=1)
    seed: int = 1


class PipelineConfig(StrictModel):
    """The whole pipeline. Every output goes under `runs_dir`."""

    runs_dir: str = "runs"
    data: str | None = None  # a reader source; None means the synthetic source
    synthetic: SyntheticConfig = SyntheticConfig()
    filter: filter_data.FilterSettings = filter_data.FilterSettings()
    apm: train_apm_stage.TrainAPMSettings = train_apm_stage.TrainAPMSettings()
    relabel: relabel_stage.RelabelSettings = relabel_stage.RelabelSettings()
    experiment: str = "helpsteer"


def run(config: PipelineConfig) -> dict[str, Any]:
    runs = resolve_path(config.runs_dir)
    tracking = TrackingConfig(runs_dir=str(runs), experiment=config.experiment)
    summary: dict[str, Any] = {}
    with stage_run("pipeline", config, tracking):
        data = config.data
        if data is None:
            folder = runs / "data" / f"synthetic-rows{config.synthetic.rows}-seed{config.synthetic.seed}"
            files = write_synthetic(folder, rows=config.synthetic.rows, seed=config.synthetic.seed)
            log.info("synthetic: %d rows in %d file(s) -> %s", config.synthetic.rows, len(files), folder)
            data = str(folder)
        filter_config = filter_data.FilterStageConfig.model_validate(
            {
                **config.filter.model_dump(),
                "data": data,
                "out": str(runs / "filtered"),
                "tracking": tracking.model_dump(),
            }
        )
        summary["filter"] = filter_data.run(filter_config)
        apm_config = train_apm_stage.TrainAPMConfig.model_validate(
            {
                **config.apm.model_dump(),
                "data": str(runs / "filtered"),
                "out": str(runs / "apm"),
                "storage": str(runs / "ray_train"),
                "run_name": f"apm-{_fingerprint(config, data)}",
                "tracking": tracking.model_dump(),
            }
        )
        summary["apm"] = train_apm_stage.run(apm_config)
        # Relabel the training split: the APM's attributes beside the human ones, for AC-SFT.
        relabelled = runs / "relabelled"
        if relabelled.exists():
            shutil.rmtree(relabelled)  # the APM was just retrained: earlier parts are stale
        relabel_config = relabel_stage.RelabelConfig.model_validate(
            {
                **config.relabel.model_dump(),
                "apm": str(runs / "apm"),
                "data": str(runs / "filtered" / "train"),
                "out": str(relabelled),
                "tracking": tracking.model_dump(),
            }
        )
        summary["relabel"] = relabel_stage.run(relabel_config)
        mlflow.log_dict(summary, "pipeline_summary.json")
    _print_summary(summary, runs)
    return summary


def _fingerprint(config: PipelineConfig, data: str) -> str:
    """Names the APM's Ray Train run after what it trains on, so an interrupted pipeline resumes
    its own run and a changed config starts a new one."""
    text = json.dumps(
        {
            "data": data,
            "filter": config.filter.model_dump(mode="json"),
            "apm": config.apm.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _print_summary(summary: dict[str, Any], runs: Path) -> None:
    table = Table(title="helpsteer pipeline")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("output")
    stats = summary["filter"]["total"]
    table.add_row(
        "filter",
        f"{stats['input_rows']} rows: kept {stats['kept']} (train {stats['train']}, "
        f"validation {stats['validation']}), filtered {stats['filtered']}, rejected {stats['rejected']}",
        str(runs / "filtered"),
    )
    agreement = ", ".join(
        f"{name} r={m['pearson']:.2f}" if m["pearson"] is not None else f"{name} r=n/a"
        for name, m in summary["apm"]["attributes"].items()
    )
    beats = sum(bool(m["beats_baseline_rmse"]) for m in summary["apm"]["attributes"].values())
    table.add_row(
        "train-apm",
        f"validation Pearson: {agreement}; RMSE beats the mean baseline on {beats}/"
        f"{len(summary['apm']['attributes'])}",
        str(runs / "apm"),
    )
    rel = summary["relabel"]
    table.add_row(
        "relabel", f"{rel['output_rows']} rows, {rel['rows_per_second']} rows/s", str(runs / "relabelled")
    )
    Console().print(table)
    Console().print(f"MLflow: helpsteer ui --runs-dir {runs}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.pipeline", PipelineConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
