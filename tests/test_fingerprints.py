"""Content fingerprints and training-run identities (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpsteer_core.fingerprints import file_digest, folder_digest, result_settings
from helpsteer_core.outputs import IDENTITY, OutputError, training_run
from ray_jobs.relabel import _model_id
from ray_jobs.train_sft import TrainSFTSettings


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HELPSTEER_CACHE", str(tmp_path / "cache"))


def _same_size_and_mtime_edit(path: Path, offset: int) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))


def test_model_id_covers_every_byte_of_every_weight_file(tmp_path):
    apm = tmp_path / "apm"
    apm.mkdir()
    (apm / "model.safetensors").write_bytes(os.urandom(5 << 20))  # 5 MiB: past the first MiB
    (apm / "head.safetensors").write_bytes(os.urandom(1000))
    before = _model_id(apm)
    assert before == _model_id(apm)
    _same_size_and_mtime_edit(apm / "model.safetensors", (5 << 20) - 1)  # the last byte
    assert _model_id(apm) != before
    after_model = _model_id(apm)
    _same_size_and_mtime_edit(apm / "head.safetensors", 999)
    assert _model_id(apm) != after_model


def test_a_large_files_digest_is_cached_on_size_and_mtime(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(5 << 20))
    digest = file_digest(path, cached=True)
    cache = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert list(cache.values()) == [digest]
    _same_size_and_mtime_edit(path, 0)  # mtime moved: hashed again
    assert file_digest(path, cached=True) != digest
    # Data files are hashed every time: an edit that keeps size and mtime still shows.
    plain = file_digest(path)
    stat = path.stat()
    _same_size_and_mtime_edit(path, 1)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(path) != plain


def test_folder_digest_is_content_not_place_nor_marker(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "part-0.parquet").write_bytes(b"rows")
    (b / ".helpsteer-output.json").write_text('{"published": "now"}')
    assert folder_digest(a) == folder_digest(b)
    (b / "train" / "part-0.parquet").write_bytes(b"rowz")
    assert folder_digest(a) != folder_digest(b)


def test_result_settings_leave_out_the_named_fields_nested_too():
    settings = TrainSFTSettings(checkpoint_every=7)
    kept = result_settings(settings, ("checkpoint_every", "deepspeed.gradient_checkpointing"))
    assert "checkpoint_every" not in kept and "gradient_checkpointing" not in kept["deepspeed"]
    assert kept["lr"] == settings.lr and kept["deepspeed"]["zero_stage"] == 3


def test_a_training_run_is_keyed_by_identity_and_never_deleted(tmp_path):
    storage = tmp_path / "ray_train"
    first = training_run(storage, "sft", {"lr": 1e-3})
    (storage / first / "checkpoint_000000").mkdir()
    assert training_run(storage, "sft", {"lr": 1e-3}) == first  # the same identity resumes
    other = training_run(storage, "sft", {"lr": 5e-4})
    assert other != first and (storage / first / "checkpoint_000000").is_dir()
    assert json.loads((storage / other / IDENTITY).read_text()) == {"lr": 5e-4}

    # restart: the old run is moved aside, kept, and the same name starts empty.
    assert training_run(storage, "sft", {"lr": 1e-3}, restart=True) == first
    assert not (storage / first / "checkpoint_000000").exists()
    [aside] = storage.glob(f"{first}.replaced-*")
    assert (aside / "checkpoint_000000").is_dir()

    # A folder of that name that records another identity (or none) is not this run's.
    (storage / other / IDENTITY).write_text('{"lr": 1}')
    with pytest.raises(OutputError, match="another or unknown identity"):
        training_run(storage, "sft", {"lr": 5e-4})
