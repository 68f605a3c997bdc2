"""The main job (`helpsteer run`) end to end on a small synthetic set: every stage runs in order
under one parent MLflow run, and the outputs of each stage feed the next."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from helpsteer_core.config import load_config
from ray_jobs.pipeline import PipelineConfig, run
from ray_jobs.tracking import TrackingConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_local_profile_runs_every_stage_under_one_parent_run(ray_head, tiny_backbone, tmp_path):
    config = load_config(
        PipelineConfig,
        "configs/local.yaml",
        [
            f"runs_dir={tmp_path / 'runs'}",
            "synthetic.rows=160",
            f"apm.apm.backbone={tiny_backbone}",
            "apm.max_steps=3",
            "apm.eval_every=3",
            "relabel.rows_per_unit=50",
        ],
    )
    summary = run(config)
    runs = tmp_path / "runs"
    assert summary["filter"]["total"]["input_rows"] == 160
    assert (runs / "apm" / "evaluation" / "metrics.json").is_file()
    relabelled = [
        r for f in sorted((runs / "relabelled").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert len(relabelled) == summary["filter"]["total"]["train"] == summary["relabel"]["output_rows"]
    assert {"helpfulness", "apm_helpfulness", "apm_helpfulness_int"} <= set(relabelled[0])

    tracking = TrackingConfig(runs_dir=str(runs))
    client = mlflow.MlflowClient(tracking.uri())
    experiment = client.get_experiment_by_name("helpsteer")
    found = client.search_runs([experiment.experiment_id])
    parent = [r for r in found if r.data.tags.get("stage") == "pipeline"]
    assert len(parent) == 1
    children = {
        r.data.tags["stage"] for r in found if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id
    }
    assert children == {"filter_data", "train_apm", "relabel"}
    saved = client.download_artifacts(parent[0].info.run_id, "pipeline_summary.json", str(tmp_path))
    assert json.loads(Path(saved).read_text())["relabel"]["output_rows"] == len(relabelled)
