"""The stages with their workers on different Ray nodes, and a node lost mid-training.

tests/multinode_cluster.py builds a three-node cluster on this machine (`ray.cluster_utils`: a
head with no CPUs, two worker nodes of one CPU each) in its own process and runs filter, APM
training, relabel and AC-SFT on it; while AC-SFT runs, a worker node is removed once a checkpoint
is registered and a new node joins. Here: the facts it wrote, and the outputs themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from ray_jobs.tracking import TrackingConfig, runs_for

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def test_stages_run_across_nodes_and_sft_survives_losing_a_node(
    ray_head, tiny_backbone, tiny_generator, tmp_path
):
    env = {**ray_head.env}
    env.pop("RAY_ADDRESS", None)  # its own cluster, not the session's head
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "multinode_cluster.py"),
            str(tmp_path),
            str(tiny_backbone),
            str(tiny_generator),
        ],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = done.stdout + done.stderr
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert done.returncode == 0, output[-4000:]
    head, workers = facts["head"], facts["workers"]

    # Every stage's work ran on the worker nodes, two workers or actors on two different nodes:
    # outputs and checkpoints went to a path every node sees, and the driver read them back.
    assert facts["filter"]["input_rows"] == 160 and facts["filter"]["train"] > 0
    assert sorted(facts["apm_workers"]) == sorted(workers)
    assert facts["apm_rows_evaluated"] == facts["filter"]["validation"]
    assert facts["relabel_actors"] and set(facts["relabel_actors"]) <= set(workers)  # never the head
    assert facts["relabel"]["input_rows"] == facts["relabel"]["output_rows"] == facts["filter"]["train"]
    relabelled = [
        r
        for p in sorted((tmp_path / "relabelled").glob("part-*.parquet"))
        for r in pq.read_table(p).to_pylist()
    ]
    assert len(relabelled) == facts["filter"]["train"] and "apm_verbosity" in relabelled[0]
    assert head not in facts["apm_workers"] + facts["relabel_actors"] + facts["sft_workers"]

    # AC-SFT lost a node that hosted one of its workers after its first registered checkpoint, and
    # finished on the two nodes left (a spare joined before it started).
    removed, nodes = facts["removed"], [*workers, facts["spare"]]
    assert removed["node"] in removed["hosting"] and len(removed["hosting"]) == 2, facts
    assert set(facts["sft_workers"]) == set(nodes)  # first on two nodes, then on the other two
    assert facts["sft"]["steps"] == 8 and (Path(facts["sft"]["out"]) / "model.safetensors").is_file()
    restarts = [line for line in output.splitlines() if "steps " in line and "..8" in line]
    assert len(restarts) == 2, output[-4000:]  # started once, restarted once ...
    assert "steps 0..8" in restarts[0] and "steps 0..8" not in restarts[1]  # ... from a checkpoint
    tracking = TrackingConfig(runs_dir=str(tmp_path / "runs"))
    latest = runs_for(tracking, "train_sft")[0]
    steps = {
        m.step for m in mlflow.MlflowClient(tracking.uri()).get_metric_history(latest.info.run_id, "loss")
    }
    assert set(range(1, 9)) <= steps
