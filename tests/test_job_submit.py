"""End to end: the filter stage submitted with `ray job submit` to a `ray start --head` cluster,
exactly as README.md and docs show it, then its outputs and its MLflow run checked."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from helpsteer_core.synthetic import write_synthetic
from ray_jobs.tracking import TrackingConfig, runs_for

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _submit(ray_head, *stage_args: str) -> subprocess.CompletedProcess[str]:
    """`ray job submit --working-dir . -- python -m ray_jobs.filter_data ...`, as the README says."""
    stage = ["python", "-m", "ray_jobs.filter_data", "--config", "configs/filter_data.yaml", *stage_args]
    return _run(ray_head, ["ray", "job", "submit", "--working-dir", ".", "--", *stage])


def _run(ray_head, line: list[str]) -> subprocess.CompletedProcess[str]:
    """A `ray job submit ...` command line, sent to the test head (`--address` added)."""
    assert line[:3] == ["ray", "job", "submit"], line
    ray_bin = str(Path(sys.executable).parent / "ray")
    command = [ray_bin, "job", "submit", "--address", ray_head.dashboard_url, *line[3:]]
    for _ in range(30):
        done = subprocess.run(
            command, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600
        )
        # The head's agent registers a few seconds after the dashboard answers.
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(2)
    return done


def _documented_line(heading: str) -> list[str]:
    """The first `ray job submit` command in docs/operations.md after `heading`, as words."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


def test_the_documented_filter_line_runs_as_written(ray_head, mlflow_server, tmp_path):
    """docs/operations.md's line, with only its shared-storage root pointed at a temporary folder
    and its MLflow server's port at the test's server (`{head}` is still resolved by the stage)."""
    line = _documented_line("Filter (Ray Data, CPU):")
    assert "data=/mnt/shared/data/helpsteer2" in line
    assert "tracking.tracking_uri=http://{head}:5000" in line
    write_synthetic(tmp_path / "data" / "helpsteer2", rows=120, seed=12)
    port = mlflow_server.url.rsplit(":", 1)[1]
    words = [w.replace("/mnt/shared", str(tmp_path)).replace("{head}:5000", "{head}:" + port) for w in line]
    done = _run(ray_head, words)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stats = json.loads((tmp_path / "runs" / "filtered" / "stats.json").read_text())
    assert stats["total"]["input_rows"] == 120 and stats["total"]["reconciles"]
    # The run went to the server, not to a sqlite file in runs_dir.
    tracking = TrackingConfig(runs_dir=str(tmp_path / "runs"), tracking_uri=mlflow_server.url)
    assert [r.info.status for r in runs_for(tracking, "filter_data")] == ["FINISHED"]
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    mlflow.set_tracking_uri(None)  # runs_for pointed this process at the server


def test_filter_stage_through_ray_job_submit(ray_head, tmp_path):
    data, out, runs = tmp_path / "synth", tmp_path / "filtered", tmp_path / "runs"
    write_synthetic(data, rows=300, seed=11)
    done = _submit(ray_head, f"data={data}", f"out={out}", f"tracking.runs_dir={runs}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout

    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["input_rows"] == 300 and stats["total"]["reconciles"]
    assert stats["total"]["kept"] == 300
    recorded = runs_for(TrackingConfig(runs_dir=str(runs)), "filter_data")
    assert len(recorded) == 1 and recorded[0].info.status == "FINISHED"
    assert recorded[0].data.metrics["kept"] == 300


def test_job_with_a_bad_config_key_fails_and_says_which_key(ray_head, tmp_path):
    done = _submit(ray_head, f"out={tmp_path / 'out'}", "filters.max_tokns=5")
    assert done.returncode != 0
    assert "filters.max_tokns: unknown key" in done.stdout + done.stderr
