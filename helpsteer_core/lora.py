"""LoRA for attribute-conditioned SFT: the `sft.lora:` settings, the adapted model, its export.

    sft:
      lora:                    # null (the default): every parameter trains, as before
        r: 16                  # rank of each adapter's A (r x in) and B (out x r)
        alpha: 32              # the update is (alpha / r) x B A
        dropout: 0.05          # on the adapter's input, training only
        target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]

`apply_lora` wraps a causal LM with peft: the base weights are frozen and each named linear layer
of the decoder layers gets an adapter. Token rows the template added to the vocabulary (the nemo
template's `<extra_id_*>`, mean-initialised by `resize_token_embeddings`) train too, in the input
embedding and, when it is not tied to it, the output head: otherwise the end-of-turn marker would
stay an untrained row that the model never learns to emit. With `trainable_layers: N` the
adapters go on the top N decoder layers only.

`export_lora` writes both forms from one state dict (the adapted model's, consolidated from
DeepSpeed's shards): peft's adapter folder (`adapter/`: adapter_config.json and
adapter_model.safetensors) and the merged weights as a plain Hugging Face model (W + alpha/r x BA
for every adapted layer, the trained token rows in place), which `AutoModelForCausalLM` and
`load_steerable` load like a full-model output. The merge is peft's own (`merge_and_unload`), run
on a skeleton built on the meta device whose tensors are the state dict's, so no second copy of
the model is loaded.

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from helpsteer_core.config import ConfigError, StrictModel

ADAPTER_FOLDER = "adapter"  # inside an exported LoRA model folder
# Every linear layer of a Llama (and Mistral, Qwen2, SmolLM2) decoder layer.
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRASettings(StrictModel):
    """LoRA adapters instead of full-model training (the `sft.lora:` section)."""

    r: int = Field(16, ge=1)  # adapter rank
    alpha: float = Field(32.0, gt=0)  # scaling: the update is (alpha / r) x B A
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapter's input while training
    # Names of linear layers inside each decoder layer (the last part of the module name).
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR), min_length=1)

    def model_post_init(self, _: Any) -> None:
        repeated = sorted({name for name in self.target_modules if self.target_modules.count(name) > 1})
        if repeated:
            raise ConfigError(f"lora.target_modules: {repeated} given more than once")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The model's list of decoder layers (`get_decoder().layers`), or a ConfigError."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(
            f"lora: {type(model).__name__} has no decoder `layers` list; allowed: lora: null for this model"
        )
    return list(layers)


def linear_names(model: Any) -> list[str]:
    """The leaf names of the linear layers inside the decoder layers (what `target_modules` may name)."""
    names = {
        name.rsplit(".", 1)[-1]
        for layer in decoder_layers(model)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return sorted(names)


def check_targets(model: Any, settings: LoRASettings) -> None:
    """Raise a ConfigError naming every target that is not a linear layer of the decoder layers."""
    allowed = linear_names(model)
    unknown = [name for name in settings.target_modules if name not in allowed]
    if unknown:
        raise ConfigError(
            f"lora.target_modules: {unknown} are not linear layers of {type(model).__name__}'s decoder "
            f"layers; allowed: {', '.join(allowed)}"
        )


def skeleton(model_config: Any, model_class: type[torch.nn.Module]) -> Any:
    """The model built on the meta device: its modules and names, no memory (a 70B model in ms)."""
    with torch.device("meta"):
        return model_class(copy.deepcopy(model_config))


def check_generator_targets(source: str, settings: LoRASettings) -> None:
    """`check_targets` for a generator folder or hub id, from its config alone (meta skeleton)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_targets(model, settings)


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((name for name, found in model.named_modules() if found is module), None)


def apply_lora(
    model: Any,
    settings: LoRASettings,
    trainable_layers: int | None = None,
    new_tokens: Sequence[int] = (),
) -> Any:
    """`model` wrapped by peft: base frozen, adapters on `settings.target_modules` (of the top
    `trainable_layers` decoder layers when set), the `new_tokens` rows of the input embedding and
    an untied output head trained."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, settings)
    count = len(decoder_layers(model))
    layers: list[int] | None = None
    if trainable_layers is not None:
        if not 1 <= trainable_layers <= count:
            raise ConfigError(
                f"trainable_layers: {trainable_layers}; allowed: 1..{count} (this model's layers) or null"
            )
        layers = list(range(count - trainable_layers, count))
    tokens: dict[str, list[int]] | None = None
    if new_tokens:
        embedding = _module_name(model, model.get_input_embeddings())
        tokens = {str(embedding).rsplit(".", 1)[-1]: list(new_tokens)}
        head = model.get_output_embeddings()
        if head is not None and not getattr(model.config, "tie_word_embeddings", False):
            tokens[str(_module_name(model, head)).rsplit(".", 1)[-1]] = list(new_tokens)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        trainable_token_indices=tokens,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def export_lora(peft_model: Any, state: Mapping[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> Any:
    """Write the adapter to `folder/adapter` and return the merged model (a plain transformers
    model in `dtype` on CPU, its tensors built from `state`) for the caller to `save_pretrained`.

    `state` is `peft_model`'s full state dict (base and adapter tensors on CPU, in `dtype`: no
    second copy in another dtype is made). peft computes each B A product in float32 on CPU and
    adds it to the weight. Non-persistent buffers (rotary frequencies) stay on the meta device:
    `save_pretrained` does not write them, and loading the folder recomputes them.
    """
    folder = Path(folder)
    peft_model.save_pretrained(folder / ADAPTER_FOLDER, state_dict=dict(state))
    base = peft_model.get_base_model()
    rebuilt = _rebuilt(peft_model, type(base), base.config)
    _, unexpected = rebuilt.load_state_dict(dict(state), strict=False, assign=True)
    meta = [name for name, p in rebuilt.named_parameters() if p.is_meta]
    if meta or unexpected:
        raise RuntimeError(
            f"LoRA export: state dict does not fit the model: missing {meta}, unexpected {unexpected}"
        )
    merged = rebuilt.merge_and_unload()
    merged.to(dtype)
    return merged


def _rebuilt(peft_model: Any, model_class: type[torch.nn.Module], model_config: Any) -> Any:
    """A meta-device copy of `peft_model` (same adapters, same names), ready for `assign=True`."""
    from peft import get_peft_model

    base = skeleton(model_config, model_class)
    # The config's vocab_size follows resize_token_embeddings (the template's added tokens).
    if base.get_input_embeddings().num_embeddings != model_config.vocab_size:
        base.resize_token_embeddings(model_config.vocab_size, mean_resizing=False)
    config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    with torch.device("meta"):
        rebuilt = get_peft_model(base, config)
    return rebuilt


__all__ = [
    "ADAPTER_FOLDER",
    "LLAMA_LINEAR",
    "LoRASettings",
    "apply_lora",
    "check_generator_targets",
    "check_targets",
    "export_lora",
    "linear_names",
]
