"""The `helpsteer` command as a user runs it: synth -> filter, exit statuses, and the MLflow UI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
HELPSTEER = str(Path(sys.executable).parent / "helpsteer")


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELPSTEER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_synth_then_filter_then_ui(ray_head, tmp_path):
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    synth = _run(["synth", "--rows", "2000", "--seed", "1", "--out", "D"], env, tmp_path)
    assert synth.returncode == 0, synth.stderr
    first = _run(["filter", "--data", "D", "--out", "F", "--set", "tracking.runs_dir=runs"], env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "F"
    for name in ("train", "validation", "rejects", "filtered", "stats.json"):
        assert (out / name).exists(), name
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["input_rows"] == 2000 and stats["total"]["reconciles"]

    # A second run gives the same rows (file names differ run to run; contents do not).
    def rows(folder: Path) -> list[dict]:
        return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]

    before = rows(out / "train")
    again = _run(["filter", "--data", "D", "--out", "F", "--set", "tracking.runs_dir=runs"], env, tmp_path)
    assert again.returncode == 0
    assert before and len(before) == stats["total"]["train"]
    assert rows(out / "train") == before

    # The MLflow UI serves the runs database, on loopback only.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        [HELPSTEER, "ui", "--runs-dir", "runs", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        body = ""
        for _ in range(90):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert "MLflow" in body or "mlflow" in body
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the whole session: the MLflow server's workers too
        ui.wait(timeout=30)


def test_exit_status_is_nonzero_only_when_the_input_cannot_be_read(ray_head, tmp_path):
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    missing = _run(["filter", "--data", "nowhere/missing.jsonl", "--out", "F"], env, tmp_path)
    assert missing.returncode == 2
    assert str(tmp_path / "nowhere" / "missing.jsonl") in missing.stderr

    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r", "helpfulness": 9}\nnot json\n')
    bad = _run(
        ["filter", "--data", "bad.jsonl", "--out", "F", "--set", "tracking.runs_dir=runs"], env, tmp_path
    )
    assert bad.returncode == 0, bad.stderr[-2000:]
    rejects = (tmp_path / "F" / "rejects" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(r)["field"] for r in rejects] == ["helpfulness", "line"]

    typo = _run(
        ["filter", "--data", "bad.jsonl", "--out", "F", "--set", "filters.min_prompt_tokenz=3"], env, tmp_path
    )
    assert typo.returncode == 2 and "filters.min_prompt_tokenz: unknown key" in typo.stderr
