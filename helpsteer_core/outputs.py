"""Stage output folders: written to a staging folder, then published into `out` safely.

Every stage writes its output into `.<out>.partial` beside `out` and publishes it when complete.
Two rules (docs/architecture.md, "Run identity and overwrites"):

- A stage only replaces a folder it wrote itself. Every output carries a marker file,
  `.helpsteer-output.json`, naming the stage; an existing `out` without this stage's marker (a
  user's folder, `.`, $HOME, another stage's output) is refused with an error naming the folder,
  before any work starts, and nothing is deleted.
- The previous output stays intact until the new one is complete: the old folder is renamed
  aside (`.<out>.previous`), the new one renamed in, and only then is the old one deleted. A crash
  before publishing leaves the old output untouched; a crash between the two renames leaves it
  aside, and the next `prepare_output` for that `out` puts it back.

    staging = prepare_output(out, "filter")   # refuses now, before the expensive work
    ... write everything into staging ...
    publish(staging, out, "filter")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from helpsteer_core.fingerprints import settings_key

log = logging.getLogger("helpsteer.outputs")
MARKER = ".helpsteer-output.json"
MARKER_VERSION = 1


class OutputError(FileExistsError):
    """`out` is a folder this stage may not replace."""


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def previous_path(out: Path) -> Path:
    return out.parent / f".{out.name}.previous"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a stage output, or None when `folder` holds none (or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def check_replaceable(out: Path, stage: str) -> None:
    """Raise OutputError unless `out` is absent or an output this stage wrote."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder the {stage} stage wrote; give another `out`")
    marker = read_marker(out)
    if marker is None:
        raise OutputError(
            f"{out} exists and was not written by the {stage} stage (no {MARKER} in it); nothing was "
            "deleted: give another `out`, or remove the folder yourself"
        )
    if marker.get("stage") != stage:
        raise OutputError(
            f"{out} is the output of the {marker.get('stage')!r} stage, not {stage!r}; nothing was "
            "deleted: give another `out`"
        )


def prepare_output(out: Path, stage: str) -> Path:
    """Check that `out` may be replaced by `stage` and return a fresh (absent) staging path.

    Call it before the expensive work, so that a wrong `out` costs nothing. An output left aside
    by a crash mid-publish is put back first.
    """
    out = Path(out)
    previous = previous_path(out)
    if not out.exists() and (read_marker(previous) or {}).get("stage") == stage:
        previous.rename(out)  # a crash between publish's two renames: the old output comes back
    check_replaceable(out, stage)
    staging = staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left half written
    out.parent.mkdir(parents=True, exist_ok=True)
    return staging


def publish(staging: Path, out: Path, stage: str) -> Path:
    """Mark `staging` as `stage`'s output and swap it into `out`; the old output goes last."""
    staging, out = Path(staging), Path(out)
    if not staging.is_dir():
        raise FileNotFoundError(f"{staging}: no staged output to publish")
    check_replaceable(out, stage)  # again: `out` may have appeared while the stage ran
    mark_output(staging, stage)
    if not out.exists():
        staging.rename(out)
        return out
    previous = previous_path(out)
    if previous.exists() or previous.is_symlink():
        # Only an earlier output of this stage, left aside by a crash, is cleared from the way.
        if previous.is_symlink() or (read_marker(previous) or {}).get("stage") != stage:
            raise OutputError(
                f"{previous} is in the way and was not written by the {stage} stage; nothing was "
                "deleted: move it and run again"
            )
        shutil.rmtree(previous)
    out.rename(previous)
    try:
        staging.rename(out)
    except OSError:
        previous.rename(out)  # the old output stays the output
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return out


def mark_output(folder: Path, stage: str) -> None:
    """Write `stage`'s marker into `folder` (publish does; relabel, which fills `out` in place)."""
    marker = {"stage": stage, "version": MARKER_VERSION, "published": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = Path(folder) / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, Path(folder) / MARKER)


# Training runs: a checkpoint folder per identity (docs/architecture.md, "Run identity").
IDENTITY = "helpsteer-identity.json"
# Training settings that never change the trained weights: how fast it runs, how often it saves or
# measures, how many failures it survives. (Workers, micro-batch and accumulation do count: they
# make the global batch, and a ZeRO checkpoint is cut for its world size.)
TRAINING_SPEED_ONLY = (
    "cpus_per_worker",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "deepspeed.gradient_checkpointing",
)
# Growing these continues a run (the resume tests); every other change starts a new one.
CONTINUES = ("max_steps", "epochs")
# Where a stage reads and writes, not what: inputs enter an identity by their content digest.
PLACES = ("data", "validation", "out", "run_name", "storage", "tracking", "restart")


def training_run(storage: Path, name: str, identity: dict[str, Any], restart: bool = False) -> str:
    """The Ray Train run name for a training run of `identity`: `<name>-<hash of identity>`.

    `identity` holds what changes the trained weights (settings without the speed-only ones and
    without max_steps/epochs, the content digests of the data and the starting model). The same
    identity resumes its own checkpoints, so a killed run re-run with the same config continues
    and a larger max_steps carries on; any other change gets another folder and starts at step 1.
    Old runs are never deleted: `restart` moves this identity's folder aside to
    `<run>.replaced-<time>` (and says so) and starts over. A folder of this name whose recorded
    identity differs, or that records none, is refused: it is not this run's.
    """
    storage = Path(storage)
    run = f"{name}-{settings_key(identity)}"
    folder = storage / run
    recorded = folder / IDENTITY
    if folder.exists() and restart:
        aside = storage / f"{run}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.rename(aside)
        log.warning("%s: restart: the previous run of this identity was moved to %s (kept)", run, aside)
    elif folder.exists():
        try:
            found = json.loads(recorded.read_text())
        except (OSError, ValueError):
            found = None
        if found != json.loads(json.dumps(identity, default=str)):
            raise OutputError(
                f"{folder} holds a training run of another or unknown identity ({recorded}); nothing was "
                "deleted: give another `run_name` or `storage`"
            )
        log.info("%s: resuming this identity's run from its latest checkpoint in %s", run, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not recorded.is_file():
        log.info("%s: a new run (identity in %s)", run, recorded)
        tmp = folder / f"{IDENTITY}.tmp"
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, recorded)
    return run
