"""The Attribute Prediction Model: shapes, the masked loss, truncation, save/load, batching,
prediction order, and a tiny training run that must lower the loss.

Mechanics use tiny models built from config (a 2-layer BERT on the MiniLM vocabulary, a 2-layer
Llama on a byte-level tokenizer); one test loads the packaged MiniLM-L6 offline."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from helpsteer_core.apm import (
    APMConfig,
    AttributePredictionModel,
    collate,
    encode_pairs,
    is_decoder_config,
    masked_mse,
    pad_token_id,
    predict,
    round_clip,
    targets_from_rows,
    token_budget_batches,
)
from helpsteer_core.attributes import HELPSTEER, SCHEMA_FILE, STEERLM
from helpsteer_core.conversation import SPECIAL_TOKENS, TURN_TOKEN
from helpsteer_core.model_sources import MINILM, load_tokenizer

N_ATTR = len(STEERLM.names)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain recursion to a child in two sentences, please, with an example.",
    "hi",
    "First question\n<extra_id_1>Assistant\nFirst answer\n<extra_id_1>User\nAnd a follow-up?",
]
RESPONSES = [
    "Paris.",
    "Soft rain on the roof / the gutters hum a low song / the street shines like glass",
    "Recursion is when something is defined using a smaller copy of itself. Like dolls in dolls.",
    "Hello! How can I help you today?",
    "Here is the follow-up answer.",
]


# --- tiny models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tokenizer() -> Any:
    return load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with eos/pad/bos and the SteerLM
    markers as single tokens: every string round-trips, so truncation is easy to read back."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS),
    )


def tiny_bert(tokenizer: Any, config: APMConfig | None = None, seed: int = 0) -> AttributePredictionModel:
    torch.manual_seed(seed)
    backbone = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    return AttributePredictionModel(backbone, STEERLM, config or APMConfig(max_length=128), tokenizer)


def tiny_llama(tokenizer: Any, config: APMConfig | None = None, seed: int = 0) -> AttributePredictionModel:
    torch.manual_seed(seed)
    backbone = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    )
    return AttributePredictionModel(backbone, STEERLM, config or APMConfig(max_length=256), tokenizer)


@pytest.fixture(params=["encoder", "decoder"])
def tiny_apm(
    request: pytest.FixtureRequest, bert_tokenizer: Any, byte_tokenizer: Any
) -> AttributePredictionModel:
    if request.param == "encoder":
        return tiny_bert(bert_tokenizer)
    return tiny_llama(byte_tokenizer)


def batch_for(model: AttributePredictionModel, n: int = len(PROMPTS)) -> dict[str, torch.Tensor]:
    ids = encode_pairs(model.tokenizer, PROMPTS[:n], RESPONSES[:n], model.config, model.is_decoder)
    return collate(ids, pad_token_id(model.tokenizer))


# --- construction and forward --------------------------------------------------------------------


def test_backbone_kind_and_readout_are_detected(tiny_apm: AttributePredictionModel) -> None:
    if isinstance(tiny_apm.backbone, LlamaModel):
        assert tiny_apm.is_decoder and tiny_apm.readout == "last"
    else:
        assert not tiny_apm.is_decoder and tiny_apm.readout == "mean"
    assert torch.all(tiny_apm.head.bias == 2.0)


def test_decoder_detection_from_config() -> None:
    assert is_decoder_config(LlamaConfig())
    assert not is_decoder_config(BertConfig())
    qwen_like = BertConfig(architectures=["Qwen2ForCausalLM"])
    assert is_decoder_config(qwen_like)


def test_forward_gives_one_prediction_per_attribute(tiny_apm: AttributePredictionModel) -> None:
    batch = batch_for(tiny_apm)
    out = tiny_apm(batch["input_ids"], batch["attention_mask"])  # (batch, n_attr)
    assert out.shape == (len(PROMPTS), N_ATTR)
    assert out.dtype == torch.float32
    # The head starts mid-range: an untrained model predicts about 2.0.
    assert torch.allclose(out, torch.full_like(out, 2.0), atol=0.5)


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="max_lenght"):
        APMConfig(max_lenght=10)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_length"):
        APMConfig(max_length=2)
    with pytest.raises(ValueError, match="readout"):
        APMConfig(readout="max")  # type: ignore[arg-type]


# --- the masked loss ----------------------------------------------------------------------------


def grads_for(
    model: AttributePredictionModel, target: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    batch = batch_for(model)
    loss = masked_mse(model(batch["input_ids"], batch["attention_mask"]), target, mask)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_attributes_contribute_no_gradient(tiny_apm: AttributePredictionModel) -> None:
    tiny_apm.dropout.p = 0.0
    tiny_apm.eval()  # no dropout in the backbone either, so two passes are identical
    gen = torch.Generator().manual_seed(1)
    n = len(PROMPTS)
    mask = (torch.rand((n, N_ATTR), generator=gen) < 0.5).float()
    unused = STEERLM.index("humor")
    mask[:, unused] = 0.0  # masked in the whole batch
    mask[0, STEERLM.index("helpfulness")] = 1.0
    labels = torch.randint(0, 5, (n, N_ATTR), generator=gen).float()
    garbage_a = torch.where(mask.bool(), labels, torch.full_like(labels, 1e6))
    garbage_b = torch.where(mask.bool(), labels, torch.full_like(labels, float("nan")))
    garbage_c = torch.where(mask.bool(), labels, -3e5 * torch.rand((n, N_ATTR), generator=gen))

    grads_a = grads_for(tiny_apm, garbage_a, mask)
    grads_b = grads_for(tiny_apm, garbage_b, mask)
    grads_c = grads_for(tiny_apm, garbage_c, mask)
    assert grads_a.keys() == grads_b.keys() == grads_c.keys()
    assert len(grads_a) > 10  # the backbone gets gradients, not only the head
    for name in grads_a:
        assert torch.isfinite(grads_a[name]).all(), name
        assert torch.equal(grads_a[name], grads_b[name]), name
        assert torch.equal(grads_a[name], grads_c[name]), name
    # The head row of an attribute masked in the whole batch gets exactly zero gradient.
    assert torch.all(grads_a["head.weight"][unused] == 0)
    assert grads_a["head.bias"][unused] == 0
    assert grads_a["head.weight"][STEERLM.index("helpfulness")].abs().sum() > 0


def test_masked_mse_is_the_mean_over_labelled_entries() -> None:
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 2.0]], requires_grad=True)
    target = torch.tensor([[2.0, 9.0, 3.0], [4.0, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    loss = masked_mse(pred, target, mask)
    assert loss.item() == pytest.approx((1.0 + 0.0 + 16.0) / 3)
    loss.backward()
    assert pred.grad is not None
    assert pred.grad[:, 1].abs().sum() == 0 and pred.grad[1, 2] == 0


def test_a_batch_without_labels_gives_zero_that_still_backpropagates() -> None:
    pred = torch.randn(3, N_ATTR, requires_grad=True)
    loss = masked_mse(pred, torch.full((3, N_ATTR), float("nan")), torch.zeros(3, N_ATTR))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_targets_from_rows_marks_missing_and_rejects_bad_values() -> None:
    rows: list[dict[str, Any]] = [
        {"helpfulness": 4, "verbosity": 1.0, "humor": None},
        {"quality": float("nan"), "toxicity": 0},
    ]
    target, mask = targets_from_rows(rows, STEERLM)
    assert target.shape == mask.shape == (2, N_ATTR)
    assert mask[0].tolist() == [float(n in {"helpfulness", "verbosity"}) for n in STEERLM.names]
    assert target[0, STEERLM.index("helpfulness")] == 4 and target[0, STEERLM.index("verbosity")] == 1
    assert mask[1].tolist() == [float(n == "toxicity") for n in STEERLM.names]
    assert target[1].sum() == 0
    with pytest.raises(ValueError, match=r"row 1: .*'coherence' = 5 is outside the range"):
        targets_from_rows([{"coherence": 4}, {"coherence": 5}], STEERLM)
    with pytest.raises(ValueError, match="not an integer"):
        targets_from_rows([{"coherence": 2.5}], STEERLM)


def test_round_clip_is_explicit() -> None:
    preds = np.array([[-0.7, 0.49, 0.5, 2.5, 3.51, 4.6, 9.0, -9.0, 2.0]])
    assert round_clip(preds, STEERLM).tolist() == [[0, 0, 1, 3, 4, 4, 4, 0, 2]]
    assert round_clip(preds, STEERLM).dtype == np.int64
    with pytest.raises(ValueError, match="NaN"):
        round_clip(np.array([[np.nan]]), STEERLM)


# --- truncation --------------------------------------------------------------------------------


def test_short_encoder_pair_is_the_standard_bert_pair(bert_tokenizer: Any) -> None:
    [ids] = encode_pairs(bert_tokenizer, [PROMPTS[0]], [RESPONSES[0]], APMConfig(), is_decoder=False)
    assert ids == bert_tokenizer(PROMPTS[0], RESPONSES[0])["input_ids"]


def test_encoder_truncation_drops_the_prompt_start_first(bert_tokenizer: Any) -> None:
    prompt = " ".join(f"alpha{i}" for i in range(60))
    response = "The answer ends with zebra."
    p = bert_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = bert_tokenizer(response, add_special_tokens=False)["input_ids"]
    config = APMConfig(max_length=24)
    [ids] = encode_pairs(bert_tokenizer, [prompt], [response], config, is_decoder=False)
    cls_id, sep_id = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    keep = 24 - 3 - len(r)
    assert keep > 0
    assert ids == [cls_id, *p[-keep:], sep_id, *r, sep_id]
    assert len(ids) == 24 and ids[-1] == sep_id
    words = bert_tokenizer.decode(ids, skip_special_tokens=True).split()
    assert "alpha0" not in words and "alpha59" in words  # the prompt's start is gone, its end kept
    assert words[-1] == "zebra."


def test_encoder_response_longer_than_the_budget_keeps_its_end(bert_tokenizer: Any) -> None:
    response = " ".join(f"word{i}" for i in range(80)) + " finale"
    r = bert_tokenizer(response, add_special_tokens=False)["input_ids"]
    [ids] = encode_pairs(bert_tokenizer, ["a prompt"], [response], APMConfig(max_length=16), is_decoder=False)
    cls_id, sep_id = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert ids == [cls_id, sep_id, *r[-13:], sep_id]
    assert bert_tokenizer.decode(ids[-3:-1]).replace(" ", "").endswith("finale")


def test_decoder_input_is_the_rendered_conversation_plus_readout(byte_tokenizer: Any) -> None:
    [ids] = encode_pairs(byte_tokenizer, [PROMPTS[4]], [RESPONSES[4]], APMConfig(), is_decoder=True)
    assert byte_tokenizer.decode(ids) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nFirst question\n<extra_id_1>Assistant\nFirst answer\n"
        "<extra_id_1>User\nAnd a follow-up?\n<extra_id_1>Assistant\nHere is the follow-up answer.\n"
        "<extra_id_1></s>"
    )
    assert ids[-1] == byte_tokenizer.eos_token_id


def test_decoder_truncation_keeps_the_readout_and_the_response_end(byte_tokenizer: Any) -> None:
    prompt = "START " + "filler " * 100 + "END OF PROMPT"
    response = "a short response that ends here"
    [ids] = encode_pairs(byte_tokenizer, [prompt], [response], APMConfig(max_length=80), is_decoder=True)
    text = byte_tokenizer.decode(ids)
    assert len(ids) == 80
    assert ids[-1] == byte_tokenizer.eos_token_id
    assert text.endswith(f"END OF PROMPT\n{TURN_TOKEN}Assistant\n{response}\n{TURN_TOKEN}</s>")
    assert "START" not in text and "System" not in text


def test_decoder_response_longer_than_the_budget_keeps_its_end(byte_tokenizer: Any) -> None:
    response = "BEGIN " + "x" * 300 + " the very end."
    [ids] = encode_pairs(byte_tokenizer, ["question"], [response], APMConfig(max_length=40), is_decoder=True)
    text = byte_tokenizer.decode(ids)
    assert len(ids) == 40 and ids[-1] == byte_tokenizer.eos_token_id
    assert text.endswith(f"x the very end.\n{TURN_TOKEN}</s>")
    assert "BEGIN" not in text and "question" not in text


def test_collate_pads_right(bert_tokenizer: Any) -> None:
    batch = collate([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# --- batching and prediction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_tokens,max_rows", [(1, None), (50, None), (200, 3), (10_000, None), (10_000, 4)]
)
def test_token_budget_batches_cover_every_index_within_budget(max_tokens: int, max_rows: int | None) -> None:
    rng = random.Random(max_tokens)
    lengths = [rng.randint(1, 120) for _ in range(97)]
    batches = token_budget_batches(lengths, max_tokens, max_rows)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= max_tokens
        assert max_rows is None or len(batch) <= max_rows
    assert batches == token_budget_batches(lengths, max_tokens, max_rows)  # deterministic


def test_token_budget_batches_edge_cases() -> None:
    assert token_budget_batches([], 100) == []
    assert token_budget_batches([500, 3, 3], 100) == [[0], [1, 2]]  # the long row alone
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches([1], 0)


def test_predict_returns_rows_in_input_order(tiny_apm: AttributePredictionModel) -> None:
    tiny_apm.train()
    prompts, responses = PROMPTS * 2, RESPONSES[::-1] * 2
    together = predict(tiny_apm, tiny_apm.tokenizer, prompts, responses, max_tokens=300)
    assert tiny_apm.training  # put back in the mode it was in
    one_by_one = np.concatenate(
        [predict(tiny_apm, tiny_apm.tokenizer, [p], [r]) for p, r in zip(prompts, responses, strict=True)]
    )
    assert together.shape == (len(prompts), N_ATTR) and together.dtype == np.float32
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    # Rows differ from each other, so a permutation would have been caught.
    assert np.abs(together[0] - together[1]).max() > 1e-4
    assert predict(tiny_apm, tiny_apm.tokenizer, [], []).shape == (0, N_ATTR)


# --- save and load -----------------------------------------------------------------------------


def test_save_and_load_round_trip(tiny_apm: AttributePredictionModel, tmp_path: Path) -> None:
    folder = tiny_apm.save_pretrained(tmp_path / "apm")
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "head.safetensors",
        SCHEMA_FILE,
        "apm_config.json",
        "tokenizer_config.json",
    } <= names
    assert any(n.endswith(".safetensors") and n != "head.safetensors" for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]

    loaded = AttributePredictionModel.from_pretrained(folder)
    assert loaded.config == tiny_apm.config and loaded.schema == STEERLM
    assert loaded.is_decoder == tiny_apm.is_decoder and loaded.readout == tiny_apm.readout
    before = predict(tiny_apm, tiny_apm.tokenizer, PROMPTS, RESPONSES)
    after = predict(loaded, loaded.tokenizer, PROMPTS, RESPONSES)
    np.testing.assert_array_equal(before, after)


def test_loading_with_another_schema_names_the_schema_file(bert_tokenizer: Any, tmp_path: Path) -> None:
    folder = tiny_bert(bert_tokenizer).save_pretrained(tmp_path / "apm")
    with pytest.raises(ValueError, match=SCHEMA_FILE.replace(".", r"\.")):
        AttributePredictionModel.from_pretrained(folder, expected_schema=HELPSTEER)
    # expected_schema=None accepts whatever the folder holds.
    assert AttributePredictionModel.from_pretrained(folder, expected_schema=None).schema == STEERLM


def test_loading_refuses_a_folder_without_safetensors(bert_tokenizer: Any, tmp_path: Path) -> None:
    folder = tiny_bert(bert_tokenizer).save_pretrained(tmp_path / "apm")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(OSError):
        AttributePredictionModel.from_pretrained(folder)


# --- training ----------------------------------------------------------------------------------


def toy_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Planted signal: helpfulness 4 for 'great' answers, 0 for 'awful'; verbosity = length;
    every row leaves some attributes unlabelled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        words = rng.randint(1, 4)
        response = " ".join(["great" if good else "awful"] * words)
        rows.append(
            {
                "prompt": rng.choice(["how was it?", "rate the movie", "tell me"]),
                "response": response,
                "helpfulness": 4 if good else 0,
                "verbosity": words if rng.random() < 0.8 else None,
                "coherence": 3 if rng.random() < 0.5 else None,
            }
        )
    return rows


def test_training_a_tiny_apm_lowers_the_masked_loss(bert_tokenizer: Any) -> None:
    model = tiny_bert(bert_tokenizer, APMConfig(max_length=64, dropout=0.0), seed=3)
    rows = toy_rows(64, seed=7)
    ids = encode_pairs(
        bert_tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], model.config, False
    )
    target, mask = targets_from_rows(rows, STEERLM)
    assert 0 < mask.sum() < mask.numel()
    pad = pad_token_id(bert_tokenizer)

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            batch = collate(ids, pad)
            return masked_mse(model(batch["input_ids"], batch["attention_mask"]), target, mask).item()

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = full_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(30):
        pick = torch.randperm(len(rows), generator=gen)[:16].tolist()
        batch = collate([ids[i] for i in pick], pad)
        loss = masked_mse(model(batch["input_ids"], batch["attention_mask"]), target[pick], mask[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = full_loss()
    assert after < 0.25 * before, (before, after, losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert "head.weight" in changed and "backbone.embeddings.word_embeddings.weight" in changed
    # The frozen BERT pooler (unused by every readout) did not move.
    assert not [n for n in changed if ".pooler." in n]


# --- the packaged MiniLM -----------------------------------------------------------------------


def test_packaged_minilm_loads_offline_and_encodes_a_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AttributePredictionModel.from_backbone(APMConfig(), STEERLM)
    assert not model.is_decoder and model.readout == "mean"
    assert model.head.out_features == N_ATTR and model.head.in_features == 384
    prompt = "What are three tips for staying productive while working from home?"
    response = "1. Keep a fixed schedule.\n2. Use a dedicated workspace.\n3. Take short breaks."
    [ids] = encode_pairs(model.tokenizer, [prompt], [response], model.config, model.is_decoder)
    assert ids[0] == model.tokenizer.cls_token_id == 101
    assert ids[-1] == model.tokenizer.sep_token_id == 102
    assert ids.count(102) == 2
    preds = predict(model, model.tokenizer, [prompt], [response])
    assert preds.shape == (1, N_ATTR) and np.all(np.abs(preds - 2.0) < 1.0)


def test_max_length_beyond_the_backbone_positions_is_refused() -> None:
    with pytest.raises(ValueError, match="max_length 1024 exceeds the 512 positions"):
        AttributePredictionModel.from_backbone(APMConfig(max_length=1024))
