"""The stages on a multi-node Ray cluster on one machine, run by tests/test_multinode.py in its own
process (a process joins one Ray cluster; the test session is on the shared head already).

    python tests/multinode_cluster.py ROOT BACKBONE GENERATOR  -> ROOT/facts.json

`ray.cluster_utils.Cluster`: a head with no CPUs (it runs only this driver, as the KubeRay heads
do) and two worker nodes of one CPU each, so a stage's two workers or actors can only run on
different nodes. Filter, APM training (2 DDP workers), relabel (2 actors) and AC-SFT (2 workers,
ZeRO-2) run on it with every output on a path all nodes see; during AC-SFT, once a checkpoint is
registered, one worker node is removed and a fresh one joins, and the run must finish from that
checkpoint. What happened is written as facts for the test to check.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

OBJECT_STORE = 150 * 1024 * 1024


def _actors(class_part: str, skip: set[str] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    """actor id -> node id of every actor (alive or dead) whose class name contains `class_part`."""
    found = list_actors(limit=10_000, detail=True)
    return {
        a.actor_id: a.node_id
        for a in found
        if class_part in a.class_name and a.actor_id not in skip and a.node_id  # placed: on a node
    }


def _nodes_of(class_part: str, skip: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    return sorted(set(_actors(class_part, skip).values()))


def _registered(run_folders: list[Path]) -> bool:
    """Whether Ray Train has registered a checkpoint in one of these run folders."""
    for folder in run_folders:
        snapshot = folder / "checkpoint_manager_snapshot.json"
        if snapshot.is_file() and json.loads(snapshot.read_text()).get("checkpoint_results"):
            return True
    return False


def main(root: Path, backbone: str, generator: str) -> None:
    from helpsteer_core.synthetic import write_synthetic
    from ray_jobs.filter_data import FilterStageConfig
    from ray_jobs.filter_data import run as run_filter
    from ray_jobs.relabel import RelabelConfig
    from ray_jobs.relabel import run as run_relabel
    from ray_jobs.train_apm import TrainAPMConfig
    from ray_jobs.train_apm import run as run_apm
    from ray_jobs.train_sft import TrainSFTConfig
    from ray_jobs.train_sft import run as run_sft

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE}
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
    ray.init(address=cluster.address)
    facts: dict[str, Any] = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}
    tracking = {"runs_dir": str(root / "runs")}
    try:
        write_synthetic(root / "data", rows=160, seed=3)
        filtered = run_filter(
            FilterStageConfig.model_validate(
                {"data": str(root / "data"), "out": str(root / "filtered"), "tracking": tracking}
            )
        )
        facts["filter"] = filtered["total"]

        apm = run_apm(
            TrainAPMConfig.model_validate(
                {
                    "data": str(root / "filtered"),
                    "out": str(root / "apm"),
                    "apm": {"backbone": backbone},
                    "num_workers": 2,
                    "batch_size": 8,
                    "max_steps": 2,
                    "eval_every": 2,
                    "checkpoint_every": 2,
                    "storage": str(root / "ray_train"),
                    "tracking": tracking,
                }
            )
        )
        facts["apm_workers"] = _nodes_of("RayTrainWorker")
        facts["apm_rows_evaluated"] = apm["rows"]

        relabelled = run_relabel(
            RelabelConfig.model_validate(
                {
                    "apm": str(root / "apm"),
                    "data": str(root / "filtered" / "train"),
                    "out": str(root / "relabelled"),
                    "rows_per_unit": 20,
                    "actors": 2,
                    "cpus_per_actor": 1,
                    "tracking": tracking,
                }
            )
        )
        facts["relabel"] = {k: relabelled[k] for k in ("input_rows", "output_rows")}
        facts["relabel_actors"] = _nodes_of("Relabeler")

        sft_config = TrainSFTConfig.model_validate(
            {
                "data": str(root / "relabelled"),
                "out": str(root / "sft"),
                "generator": generator,
                "examples": {"template": "chat", "max_length": 160},
                "deepspeed": {"zero_stage": 2},
                "num_workers": 2,
                "micro_batch_size": 1,
                "accumulation_steps": 2,
                "max_steps": 8,
                "lr": 1e-3,
                "checkpoint_every": 2,
                "eval_every": 100,
                "max_failures": 2,
                "run_name": "multinode",
                "storage": str(root / "ray_train"),
                "tracking": tracking,
            }
        )
        apm_workers = set(_actors("RayTrainWorker"))
        # A spare node joins now: Cluster.add_node must run in the main thread, which AC-SFT holds.
        spare = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        facts["spare"] = spare.node_id
        removed: dict[str, Any] = {}

        def remove_a_node_after_the_first_checkpoint() -> None:
            deadline = time.monotonic() + 600
            while not _registered(list((root / "ray_train").glob("multinode-*"))):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.5)
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            hosting = {a.node_id for a in alive}
            victim = next(node for node in [*workers, spare] if node.node_id in hosting)
            removed["node"], removed["hosting"] = victim.node_id, sorted(hosting)
            cluster.remove_node(victim, allow_graceful=False)
            removed["at"] = time.time()

        remover = threading.Thread(target=remove_a_node_after_the_first_checkpoint, daemon=True)
        remover.start()
        sft = run_sft(sft_config)
        remover.join(timeout=60)
        facts["sft"] = {"steps": sft["steps"], "out": sft["out"]}
        facts["sft_workers"] = _nodes_of("RayTrainWorker", skip=apm_workers)
        facts["removed"] = removed
    finally:
        (root / "facts.json").write_text(json.dumps(facts, indent=2, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
