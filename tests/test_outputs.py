"""Publishing stage outputs: a stage replaces only a folder it wrote (its marker says so), the
previous output stays intact until the new one is complete, and a folder a user gives as `out`
is refused, with its files kept, by every stage before any work starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpsteer_core.outputs import (
    MARKER,
    OutputError,
    prepare_output,
    previous_path,
    publish,
    read_marker,
    staging_path,
)

HELPSTEER = str(Path(sys.executable).parent / "helpsteer")


def _write_output(out: Path, stage: str, content: str) -> None:
    staging = prepare_output(out, stage)
    staging.mkdir()
    (staging / "result.txt").write_text(content)
    publish(staging, out, stage)


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_a_published_output_carries_the_marker_and_no_staging_is_left(tmp_path):
    out = tmp_path / "runs" / "filtered"
    _write_output(out, "filter", "first")
    assert (out / "result.txt").read_text() == "first"
    assert read_marker(out)["stage"] == "filter"
    assert not staging_path(out).exists() and not previous_path(out).exists()


def test_a_folder_the_stage_did_not_write_is_refused_and_kept(tmp_path):
    folder = _user_folder(tmp_path)
    with pytest.raises(OutputError, match=f"{folder} exists and was not written by the filter stage"):
        prepare_output(folder, "filter")
    staging = tmp_path / "staged"
    staging.mkdir()
    with pytest.raises(OutputError, match=str(folder)):  # publish checks again, too
        publish(staging, folder, "filter")
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_another_stages_output_is_refused(tmp_path):
    out = tmp_path / "apm"
    _write_output(out, "train_apm", "the model")
    with pytest.raises(OutputError, match="output of the 'train_apm' stage, not 'filter'"):
        prepare_output(out, "filter")
    assert (out / "result.txt").read_text() == "the model"


def test_a_rerun_replaces_the_stages_own_previous_output(tmp_path):
    out = tmp_path / "filtered"
    _write_output(out, "filter", "first")
    (out / "only-in-first").write_text("x")
    _write_output(out, "filter", "second")
    assert (out / "result.txt").read_text() == "second"
    assert not (out / "only-in-first").exists()  # replaced, not merged
    assert read_marker(out)["stage"] == "filter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filtered"]  # nothing left aside


def test_a_folder_in_the_previous_outputs_place_that_the_stage_did_not_write_is_kept(tmp_path):
    out = tmp_path / "filtered"
    _write_output(out, "filter", "first")
    theirs = previous_path(out)
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not ours")
    with pytest.raises(OutputError, match="is in the way and was not written by the filter stage"):
        _write_output(out, "filter", "second")
    assert (theirs / "notes.txt").read_text() == "not ours"
    assert (out / "result.txt").read_text() == "first"  # the old output is still the output


def test_a_crash_after_staging_leaves_the_old_output_intact(tmp_path):
    out = tmp_path / "filtered"
    _write_output(out, "filter", "old")
    # A real process dies (SIGKILL) after writing its new output to staging, before publishing.
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from helpsteer_core.outputs import prepare_output\n"
        "staging = prepare_output(Path(sys.argv[1]), 'filter')\n"
        "staging.mkdir()\n"
        "(staging / 'result.txt').write_text('new, half written')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    crashed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, timeout=120)
    assert crashed.returncode == -9
    assert (out / "result.txt").read_text() == "old"
    assert read_marker(out)["stage"] == "filter"
    assert staging_path(out).is_dir()  # what the crash left; the next run clears it
    _write_output(out, "filter", "new")
    assert (out / "result.txt").read_text() == "new"
    assert not staging_path(out).exists()


def test_an_output_left_aside_by_a_crash_mid_publish_is_put_back(tmp_path):
    out = tmp_path / "filtered"
    _write_output(out, "filter", "old")
    out.rename(previous_path(out))  # the state a crash between publish's two renames leaves
    staging = prepare_output(out, "filter")
    assert (out / "result.txt").read_text() == "old"
    assert not previous_path(out).exists() and not staging.exists()


def _stage_configs(tmp_path: Path, out: Path) -> dict[str, Any]:
    from ray_jobs.evaluate import EvaluateConfig
    from ray_jobs.filter_data import FilterStageConfig
    from ray_jobs.generate_answers import AnswersConfig
    from ray_jobs.train_apm import TrainAPMConfig
    from ray_jobs.train_sft import TrainSFTConfig

    data = str(tmp_path / "data")
    return {
        "filter_data": FilterStageConfig.model_validate({"data": data, "out": str(out)}),
        "train_apm": TrainAPMConfig.model_validate({"data": data, "out": str(out)}),
        "train_sft": TrainSFTConfig.model_validate({"data": data, "out": str(out)}),
        "evaluate": EvaluateConfig.model_validate({"generator": data, "data": data, "out": str(out)}),
        "generate_answers": AnswersConfig.model_validate({"out": str(out)}),
    }


@pytest.mark.parametrize("stage", ["filter_data", "train_apm", "train_sft", "evaluate", "generate_answers"])
def test_every_stage_refuses_a_user_folder_before_any_work(stage, tmp_path):
    import importlib

    folder = _user_folder(tmp_path)
    config = _stage_configs(tmp_path, folder)[stage]
    with pytest.raises(OutputError, match=f"{folder} exists and was not written by"):
        importlib.import_module(f"ray_jobs.{stage}").run(config)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_filter_with_out_dot_exits_2_naming_the_folder_and_deletes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    done = subprocess.run(
        [HELPSTEER, "filter", "--data", "data.jsonl", "--out", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{tmp_path} exists and was not written by the filter stage" in done.stderr
    assert "Traceback" not in done.stderr
    # Nothing deleted or written into the refused folder's files; the only new entry is the
    # stage's own log under its runs folder (runs/logs/filter_data-<time>.log), as for every stage.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "notes.txt", "runs"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["logs"]
    assert [p.name.split("-")[0] for p in (tmp_path / "runs" / "logs").iterdir()] == ["filter_data"]
    assert not (tmp_path / MARKER).exists()
