"""Training checkpoints written straight into the run's storage folder, never staged on local disk.

Ray Train's default hands `report` a local folder and copies it to `storage/<run>/checkpoint_*`:
every node then needs local disk for its share of a checkpoint (about 123 GB a node for the 70B
run under ZeRO-3 on 8 nodes, plus the 140 GB export on rank 0's node; docs/scaling.md). Here every
rank writes its files into `storage/<run>/checkpoint_<step>` itself (storage is a path every node
mounts) and reports that folder with `CheckpointUploadMode.NO_UPLOAD`: no local copy, no upload.
Ray Train registers the checkpoint once every rank has reported (report is a barrier), so a
half-written folder of a lost step is never resumed from; the same step written again overwrites
its files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint, CheckpointUploadMode

from helpsteer_core.config import ConfigError
from ray_jobs.deepspeed_engine import TRAINER_STATE


def checkpoint_folder(step: int) -> Path:
    """This step's checkpoint folder in the run's storage, created (every rank writes into it)."""
    storage = ray.train.get_context().get_storage()
    folder = Path(storage.experiment_fs_path) / f"checkpoint_step{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def report_in_place(metrics: dict[str, Any], folder: Path) -> None:
    """Report `folder` (from `checkpoint_folder`) as this step's checkpoint, without copying it."""
    storage = ray.train.get_context().get_storage()
    ray.train.report(
        metrics,
        checkpoint=Checkpoint(str(folder), filesystem=storage.storage_filesystem),
        checkpoint_dir_name=folder.name,
        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
    )


def refuse_going_back(run: Path, total: int, epochs: float | None = None) -> None:
    """Refuse a run asked for fewer steps than the checkpoints of the run in `run` (its storage
    folder) have reached. A training run resumes from its latest checkpoint, and max_steps is not
    part of its identity (a larger one continues the run), so a smaller one would resume past its
    end and export the longer-trained model as the shorter one. Read by the driver, before the
    workers start; the furthest step is the one rank 0 recorded in each checkpoint's trainer state
    (a half-written checkpoint of a lost step, which Ray Train never registered, has none).
    `epochs`: what the run was asked for when it was not max_steps (`total` counts its steps)."""
    steps = []
    for state in Path(run).glob(f"checkpoint_step*/{TRAINER_STATE}"):
        try:
            steps.append(int(json.loads(state.read_text())["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    reached = max(steps, default=0)
    if reached > total:
        counted = f"{total} step{'s' * (total != 1)}"
        asked = f"max_steps {total}" if epochs is None else f"epochs {epochs:g} ({counted})"
        raise ConfigError(
            f"{asked}: this identity's run {run} has trained to step {reached} already, and a run "
            f"resumes from its latest checkpoint, it cannot go back; allowed: max_steps >= {reached} "
            "(or epochs that reach it), or restart=true (the pipeline: --force) to train it from "
            "step 1 (the old run is moved aside, not deleted)"
        )
