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
import os
import shutil
import time
from pathlib import Path
from typing import Any

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
    shutil.rmtree(previous, ignore_errors=True)
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
