"""Which errors become one `error: ...` line with exit status 2 and which keep their traceback.

A mistake in what the user gave (config, data, paths, `out`) is one line naming the file and key;
a bug, a plain ValueError included, must not be disguised as one."""

from __future__ import annotations

from pathlib import Path

import pytest

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
