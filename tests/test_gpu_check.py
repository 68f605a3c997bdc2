"""bench/gpu_check.py runs before a GPU is lent: the same steps on the CPU at small sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_a_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "MASTER_PORT": "29561"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {s["step"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert {name: s["status"] for name, s in steps.items()} == {
        "cuda": "skipped",  # --device cpu
        "generation": "pass",
        "apm": "pass",
        "sft_deepspeed": "pass",
        "sft_lora": "pass",
        "vllm": "skipped",  # not installed here
    }
    for name in ("generation", "apm", "sft_deepspeed", "sft_lora"):
        assert float(steps[name]["figure"].split()[0]) > 0, steps[name]
    zero2, zero3 = steps["sft_lora"]["figure"].split()[0:3:2]
    assert float(zero2) > 0 and float(zero3) > 0, steps["sft_lora"]
    assert "6 of 6 steps did not fail" in done.stdout
