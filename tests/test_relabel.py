"""The relabel stage: predictions beside untouched input columns, unlabelled and multi-turn data,
and an interrupted run finished by a re-run with exactly one output row per input row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpsteer_core.attributes import HELPSTEER_ATTRIBUTES
from helpsteer_core.synthetic import write_synthetic
from ray_jobs.relabel import RelabelConfig, run

pytestmark = pytest.mark.slow
HELPSTEER = str(Path(sys.executable).parent / "helpsteer")


def _config(apm: Path, data: Path | str, out: Path, **kw: object) -> RelabelConfig:
    return RelabelConfig.model_validate(
        {
            "apm": str(apm),
            "data": str(data),
            "out": str(out),
            "tracking": {"runs_dir": str(out.parent / "runs")},
            **kw,
        }
    )


def _rows(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_predictions_are_added_and_human_labels_kept(trained_apm, tmp_path):
    source = trained_apm.data / "validation"
    stats = run(_config(trained_apm.model, source, tmp_path / "out", rows_per_unit=20))
    inputs = [r for f in sorted(source.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    outputs = _rows(tmp_path / "out")
    assert stats["input_rows"] == stats["output_rows"] == len(inputs) == len(outputs)
    assert stats["reconciles"] and stats["rows_per_second"] > 0
    for before, after in zip(inputs, outputs, strict=True):
        assert {k: after[k] for k in before} == before  # every input column untouched
        for name in HELPSTEER_ATTRIBUTES:
            assert isinstance(after[f"apm_{name}"], float)
            assert after[f"apm_{name}_int"] in range(5)
            assert after[f"apm_{name}_int"] == min(4, max(0, int(after[f"apm_{name}"] + 0.5)))
        assert "apm_quality" not in after  # never trained: not published
        assert after["apm_schema"] == "steerlm-v1" and after["apm_model"].startswith(str(trained_apm.model))


def test_unlabelled_and_multi_turn_rows(trained_apm, tmp_path):
    rows = [
        {"prompt": "Briefly, what is the capital of France?", "response": "Paris is the capital of France."},
        {
            "prompt": "Hi\n<extra_id_1>Assistant\nHello! How can I help?\n"
            "<extra_id_1>User\nIn one sentence, what is 2 + 3?",
            "response": "2 + 3 = 5.",
            "conversation_id": "c-7",
        },
    ]
    src = tmp_path / "unlabelled.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(_config(trained_apm.model, src, tmp_path / "out"))
    out = _rows(tmp_path / "out")
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]
    assert out[1]["conversation_id"] == "c-7"
    assert all(0 <= r["apm_verbosity_int"] <= 4 for r in out)


def test_interrupted_run_is_finished_by_a_rerun_without_duplicates(ray_head, trained_apm, tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, rows=2000, seed=9)
    out = tmp_path / "out"
    args = [
        HELPSTEER,
        "relabel",
        "--apm",
        str(trained_apm.model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        "rows_per_unit=20",
        "--set",
        "actors=1",
        "--set",
        f"tracking.runs_dir={tmp_path / 'runs'}",
    ]
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    job = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        assert job.poll() is None, "the relabel finished before it could be interrupted"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver dies mid-run; Ray reclaims its actors
    job.wait()
    written = len(list(out.glob("part-*.parquet")))
    assert 3 <= written < 100

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["units"] == 100 and stats["units_skipped_as_done"] == written
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == 2000 == len(set(ids)) == stats["output_rows"]
    assert not list(out.glob("*.tmp"))


def test_a_different_input_into_the_same_out_is_refused(trained_apm, tmp_path):
    run(_config(trained_apm.model, trained_apm.data / "validation", tmp_path / "out"))
    with pytest.raises(ValueError, match="another input or model"):
        run(_config(trained_apm.model, trained_apm.data / "train", tmp_path / "out"))
