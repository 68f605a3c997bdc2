"""Which errors become one `error: ...` line with exit status 2 and which keep their traceback.

A mistake in what the user gave (config, data, paths, `out`) is one line naming the file and key;
a bug, a plain ValueError included, must not be disguised as one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ray_start_head

from helpsteer_core.config import ConfigError, StrictModel
from helpsteer_core.readers import SourceError
from ray_jobs.runtime import STAGE_ERRORS, stage_main


class _Tiny(StrictModel):
    value: int = 1


def _raising(exc: Exception):
    def run(_config: _Tiny) -> None:
        raise exc

    return run


def test_a_plain_value_error_from_a_bug_keeps_its_traceback():
    assert ValueError not in STAGE_ERRORS
    with pytest.raises(ValueError, match="a bug"):
        stage_main(None, "prog", _Tiny, _raising(ValueError("a bug")), [])


@pytest.mark.parametrize(
    "exc", [ConfigError("configs/x.yaml:3: lr: bad"), SourceError("data/x.jsonl: not found")]
)
def test_user_errors_are_one_line_and_status_2(exc, capsys):
    assert stage_main(None, "prog", _Tiny, _raising(exc), []) == 2
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_user_mistakes_that_were_plain_value_errors_are_user_errors(tmp_path: Path):
    """Each of these was a plain ValueError, so it only printed one line because every ValueError did."""
    from helpsteer_core.model_sources import resolve_model_path
    from helpsteer_core.prompt_files import read_prompt_file
    from ray_jobs.pipeline import PipelineConfig
    from ray_jobs.pipeline import run as run_pipeline

    with pytest.raises(STAGE_ERRORS, match="--from evaluate comes after --until filter"):
        run_pipeline(PipelineConfig(from_stage="evaluate", until_stage="filter", runs_dir=str(tmp_path)))
    with pytest.raises(STAGE_ERRORS, match="unknown packaged model 'package:nope'"):
        resolve_model_path("package:nope")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(STAGE_ERRORS, match=r"prompts.jsonl:1: not JSON"):
        read_prompt_file(bad)


def test_a_local_ray_cluster_that_refuses_a_stage_is_named_with_the_way_out():
    """A stage started beside another Ray session on this machine (here a token-auth head, which
    Ray records in its temp folder) joins that cluster, as Ray does. When the cluster refuses it,
    the error names the cluster and RAY_ADDRESS=local, which gives the stage an instance of its
    own. The head records itself in a temp folder of this test's (RAY_TMPDIR), so no other Ray
    started or stopped on this machine changes what the stage finds."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    stage_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    code = "from ray_jobs.runtime import ensure_ray; ensure_ray(); print('ray is up')"
    repo = Path(__file__).resolve().parents[1]

    def start(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", code]
        given = stage_env | extra
        return subprocess.run(command, env=given, cwd=repo, capture_output=True, text=True, timeout=300)

    try:
        with ray_start_head(env) as (gcs, _):
            record = ray_tmp / "ray" / "ray_current_cluster"
            for _ in range(60):  # `ray start` records the head once its dashboard is up
                if record.is_file():
                    break
                time.sleep(1)
            recorded = record.read_text().strip()  # Ray records the head by the machine's address
            assert recorded.rpartition(":")[2] == gcs.rpartition(":")[2]
            refused = start({})
            assert refused.returncode != 0, refused.stderr[-2000:]
            assert f"could not join the local Ray cluster at {recorded} " in refused.stderr
            assert "set RAY_ADDRESS=local" in refused.stderr
            alone = start({"RAY_ADDRESS": "local"})
            assert alone.returncode == 0, alone.stderr[-2000:]
            assert "ray is up" in alone.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
