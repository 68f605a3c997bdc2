"""LoRA for AC-SFT (helpsteer_core.lora): settings, target checks, and an export whose merged
weights and adapter folder both compute what the adapted model computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpsteer_core.config import ConfigError
from helpsteer_core.generator import tiny_llama
from helpsteer_core.lora import (
    ADAPTER_FOLDER,
    LoRASettings,
    apply_lora,
    check_generator_targets,
    export_lora,
)
from ray_jobs.train_sft import TrainSFTConfig, run_identity

VOCAB = 100


def _adapted(trainable_layers: int | None = None, new_tokens: int = 0) -> torch.nn.Module:
    model = tiny_llama(vocab_size=VOCAB, layers=3)
    if new_tokens:
        model.resize_token_embeddings(VOCAB + new_tokens)
    adapted = apply_lora(
        model, LoRASettings(r=4, alpha=8), trainable_layers, list(range(VOCAB, VOCAB + new_tokens))
    )
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: B starts at zero, which would make the merge trivially right
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return adapted.eval()


def test_adapters_go_on_the_named_layers_of_the_top_layers_and_the_new_token_rows_only():
    adapted = _adapted(trainable_layers=2, new_tokens=3)
    trained = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert all(".layers.0." not in name for name in trained)
    for layer in (1, 2):
        for module in ("q_proj", "down_proj"):
            assert any(f".layers.{layer}." in n and f"{module}.lora_A" in n for n in trained), trained
    # The template's new rows train in the input embedding and the untied output head; the base does not.
    assert sum("trainable_tokens_delta" in name for name in trained) == 2
    assert not any("base_layer" in name or name.endswith("proj.weight") for name in trained)


def test_merged_export_and_adapter_folder_compute_what_the_adapted_model_computed(tmp_path: Path):
    adapted = _adapted(trainable_layers=2, new_tokens=3)
    inputs = torch.tensor([[1, 5, VOCAB, VOCAB + 1, 7, VOCAB + 2, 9]])
    expected = adapted(input_ids=inputs).logits
    untouched = tiny_llama(vocab_size=VOCAB, layers=3)
    untouched.resize_token_embeddings(VOCAB + 3)

    state = {name: tensor.detach().clone() for name, tensor in adapted.state_dict().items()}
    merged = export_lora(adapted, state, tmp_path, torch.float32)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name in loaded.state_dict())
    torch.testing.assert_close(loaded(input_ids=inputs).logits, expected, atol=1e-5, rtol=1e-4)
    # The merge changed the model (the check above is not comparing two base models).
    assert not torch.allclose(untouched.eval()(input_ids=inputs).logits, expected, atol=1e-3)

    # peft's adapter folder on the (resized) base model gives the same logits.
    base = tiny_llama(vocab_size=VOCAB, layers=3)
    base.resize_token_embeddings(VOCAB + 3)
    reloaded = PeftModel.from_pretrained(base, tmp_path / ADAPTER_FOLDER).eval()
    torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, atol=1e-5, rtol=1e-4)


def test_unknown_target_modules_name_the_models_linear_layers(tmp_path: Path):
    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as error:
        check_generator_targets(str(tmp_path), LoRASettings(target_modules=["q_proj", "query", "lm_head"]))
    message = str(error.value)
    assert "['query', 'lm_head']" in message
    assert "allowed: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    check_generator_targets(str(tmp_path), LoRASettings(target_modules=["q_proj", "v_proj"]))  # no error


def test_trainable_layers_beyond_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"trainable_layers: 4; allowed: 1..3"):
        apply_lora(tiny_llama(vocab_size=VOCAB, layers=3), LoRASettings(), trainable_layers=4)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"r": 0}, "r"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", "q_proj"]}, r"\['q_proj'\] given more than once"),
        ({"rank": 8}, "rank"),
    ],
)
def test_lora_settings_are_checked(tmp_path: Path, values: dict, message: str):
    with pytest.raises(ValueError, match=message):
        TrainSFTConfig.model_validate({"data": str(tmp_path), "out": str(tmp_path / "o"), "lora": values})


def test_lora_settings_are_part_of_the_run_identity_and_a_full_run_keeps_its_old_one(tmp_path: Path):
    (tmp_path / "data").mkdir()
    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path / "gen")
    base = {"data": str(tmp_path / "data"), "out": str(tmp_path / "o"), "generator": str(tmp_path / "gen")}
    full = run_identity(TrainSFTConfig.model_validate(base))
    assert "lora" not in full["settings"]  # the identity full-model runs had before LoRA existed
    lora = run_identity(TrainSFTConfig.model_validate(base | {"lora": {"r": 8}}))
    other_rank = run_identity(TrainSFTConfig.model_validate(base | {"lora": {"r": 4}}))
    fewer_modules = run_identity(
        TrainSFTConfig.model_validate(base | {"lora": {"r": 8, "target_modules": ["q_proj"]}})
    )
    identities = [full, lora, other_rank, fewer_modules]
    assert len({str(identity) for identity in identities}) == 4
    assert lora["settings"]["lora"]["r"] == 8
