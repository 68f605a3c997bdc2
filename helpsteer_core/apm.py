"""The Attribute Prediction Model (APM): a Hugging Face backbone plus a linear regression head.

The head has one output per attribute of the schema (STEERLM: 9, in NeMo-Aligner's order) and
predicts on the attribute scale (0..4): its bias starts at the middle of the range, so an
untrained model predicts about the mean and training starts from a sensible loss. Attributes a
row does not label are masked out of the loss (`masked_mse`), so HelpSteer rows (5 attributes)
and OpenAssistant rows (4) can share one model.

Readout, i.e. which hidden state the head sees:
- encoders (BERT, MiniLM, ...): the attention-mask-weighted mean of the last hidden state
  (`readout: auto` or `mean`), or the [CLS] position (`cls`);
- decoders (a causal LM's base model): the hidden state of the last real token, a readout token
  (the tokenizer's eos) appended after the conversation, as NeMo-Aligner reads its reward models.

Inputs (`encode_pairs`): an encoder sees `[CLS] prompt [SEP] response [SEP]`; a decoder sees the
conversation rendered by `helpsteer_core.conversation` (no attribute line) followed by the eos.
Truncation never drops what the readout needs: the start of the prompt goes first, then the start
of the response; the response's end and the special/readout tokens always stay.

A saved APM is a Hugging Face folder, safetensors only:
    config.json, model.safetensors    the backbone (`save_pretrained`)
    tokenizer files                   the tokenizer the model was trained with
    head.safetensors                  the regression head (`weight` (n_attr, hidden), `bias`)
    attribute_schema.json             checked on load against the expected schema
    apm_config.json                   the APMConfig (`backbone` records where it first came from)

The tokenizer travels with the model: `from_backbone` and `from_pretrained` set
`model.tokenizer`, `save_pretrained` writes it, and `load_apm_tokenizer(folder_or_source)` loads
it alone (e.g. for a Ray Data tokenization step that needs no weights).

Nothing here imports ray, mlflow or deepspeed; training loops live in `ray_jobs.train_apm`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from helpsteer_core.attributes import (
    STEERLM,
    AttributeSchema,
    load_and_check_schema,
    load_schema,
)
from helpsteer_core.config import ConfigError, StrictModel
from helpsteer_core.conversation import TURN_TOKEN, conversation_from_row, render_conversation
from helpsteer_core.metrics import round_clip
from helpsteer_core.model_sources import MINILM, resolve_model_path
from helpsteer_core.readers import SourceError

APM_CONFIG_FILE = "apm_config.json"
HEAD_FILE = "head.safetensors"

# Model types whose checkpoints are causal LMs even when config.is_decoder is False (it usually
# is: `is_decoder` is a BERT-era flag that Llama-style configs leave unset).
DECODER_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "gpt2",
        "gpt_neox",
        "gptj",
        "gpt_bigcode",
        "falcon",
        "opt",
        "olmo",
        "olmo2",
        "smollm3",
        "granite",
        "nemotron",
    }
)


class APMConfig(StrictModel):
    """How the APM is built; saved beside the model as apm_config.json."""

    # Hub id, local folder, or `package:...` (see model_sources); the embedded default is MiniLM-L6.
    backbone: str = MINILM
    # Total tokens per input, special and readout tokens included.
    max_length: int = Field(default=384, ge=8)
    # auto: mean pooling for encoders, the last token for decoders.
    readout: Literal["auto", "mean", "cls", "last"] = "auto"
    # Dropout on the pooled representation, before the head (the backbone keeps its own).
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


def is_decoder_config(config: Any) -> bool:
    """True for causal-LM backbones (read at the last token), False for encoders."""
    if getattr(config, "is_decoder", False):
        return True
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    return getattr(config, "model_type", "") in DECODER_MODEL_TYPES


class AttributePredictionModel(nn.Module):
    """backbone -> pooled hidden state (batch, hidden) -> dropout -> linear -> (batch, n_attr)."""

    def __init__(
        self,
        backbone: Any,
        schema: AttributeSchema,
        config: APMConfig,
        tokenizer: Any | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.schema = schema
        self.config = config
        # Kept beside the model so save_pretrained writes it; not part of the state dict.
        self.tokenizer: Any = tokenizer
        _check_max_length(config, backbone.config, config.backbone)
        self.is_decoder = is_decoder_config(backbone.config)
        self.readout: str = config.readout
        if self.readout == "auto":
            self.readout = "last" if self.is_decoder else "mean"
        hidden = int(backbone.config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(hidden, len(schema.names))
        nn.init.normal_(self.head.weight, std=0.02)
        # Mid-range (2.0 on 0..4): the untrained model predicts about the mean label.
        nn.init.constant_(self.head.bias, (schema.low + schema.high) / 2)
        # A BERT pooler is never used by any readout. Frozen, so DDP does not wait for its
        # gradients ("unused parameters") and the saved backbone still loads without warnings.
        pooler = getattr(backbone, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(batch, seq) ids and mask -> (batch, n_attr) float predictions on the schema's scale."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_decoder:
            kwargs["use_cache"] = False
        hidden = self.backbone(**kwargs).last_hidden_state  # (batch, seq, hidden)
        pooled = pool(hidden, attention_mask, self.readout)  # (batch, hidden)
        pooled = pooled.to(self.head.weight.dtype)
        return self.head(self.dropout(pooled))  # (batch, n_attr)

    @classmethod
    def from_backbone(cls, config: APMConfig, schema: AttributeSchema = STEERLM) -> AttributePredictionModel:
        """A fresh APM (untrained head) on the pretrained backbone `config.backbone`."""
        from transformers import AutoConfig, AutoModel

        path = resolve_model_path(config.backbone)
        backbone_config = AutoConfig.from_pretrained(path)
        _check_max_length(config, backbone_config, config.backbone)
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        return cls(backbone, schema, config, tokenizer=load_apm_tokenizer(config.backbone))

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the model folder (see the module docstring); returns its path.

        `state_dict` (this module's keys, `backbone.*` and `head.*`) replaces the live weights: a
        trainer that shards parameters (DeepSpeed ZeRO-3) hands in the consolidated ones.
        """
        if self.tokenizer is None:
            raise ValueError(
                "this APM has no tokenizer; set model.tokenizer (from_backbone and from_pretrained do)"
            )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        backbone = {
            k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")
        }
        self.backbone.save_pretrained(out, state_dict=backbone)
        self.tokenizer.save_pretrained(out)
        head = {
            k.removeprefix("head."): v.detach().cpu().contiguous()
            for k, v in state_dict.items()
            if k.startswith("head.")
        }
        save_file(head, str(out / HEAD_FILE), metadata={"schema": self.schema.id})
        self.schema.save(out)
        (out / APM_CONFIG_FILE).write_text(self.config.model_dump_json(indent=2) + "\n")
        stray = sorted(p.name for p in out.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"})
        if stray:
            raise RuntimeError(f"{out}: pickle files {stray} beside the model; only safetensors is allowed")
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        expected_schema: AttributeSchema | None = STEERLM,
        dtype: torch.dtype = torch.float32,
    ) -> AttributePredictionModel:
        """Load a folder written by `save_pretrained`, safetensors only, in `dtype` (bf16 on a GPU
        halves the memory: a 13B backbone is 26 GB instead of 52).

        The folder's attribute_schema.json must equal `expected_schema` (None accepts any schema).
        """
        from transformers import AutoModel

        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no APM folder here")
        if expected_schema is None:
            schema = load_schema(folder)
        else:
            schema = load_and_check_schema(folder, expected_schema)
        config_path = folder / APM_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing; was this folder written by save_pretrained?")
        try:
            config = APMConfig.model_validate_json(config_path.read_text())
        except ValueError as exc:
            raise SourceError(f"{config_path}: not a valid APM config: {exc}") from None
        backbone = AutoModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        model = cls(backbone, schema, config, tokenizer=load_apm_tokenizer(str(folder)))
        head_path = folder / HEAD_FILE
        if not head_path.is_file():
            raise FileNotFoundError(f"{head_path}: missing; the regression head is saved there")
        head = load_file(str(head_path))
        expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in head.items()}
        if found != expected:
            raise SourceError(
                f"{head_path}: head tensors {found} do not fit this backbone and schema; expected {expected}"
            )
        model.head.load_state_dict(head)
        return model.to(dtype) if dtype != torch.float32 else model


def load_apm_tokenizer(source: str | Path) -> Any:
    """The tokenizer of an APM folder, or of a backbone source (hub id, folder, `package:...`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(str(source)))


def _check_max_length(config: APMConfig, backbone_config: Any, where: str) -> None:
    positions = getattr(backbone_config, "max_position_embeddings", None)
    if positions is not None and config.max_length > int(positions):
        raise ConfigError(
            f"max_length {config.max_length} exceeds the {int(positions)} positions of backbone {where}; "
            f"allowed: max_length <= {int(positions)}"
        )


def pool(hidden: Tensor, attention_mask: Tensor, readout: str) -> Tensor:
    """(batch, seq, hidden) -> (batch, hidden) by `readout`: mean, cls or last (last real token)."""
    if readout == "mean":
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if readout == "cls":
        return hidden[:, 0]
    if readout == "last":
        # Index of the last position whose mask is 1: right or left padding both work.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"readout {readout!r}; allowed: mean, cls, last")


# --- Tokenization --------------------------------------------------------------------------------


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else eos (Llama-style tokenizers have no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Trim `prompt` from its start, then `response` from its start, to fit `budget` tokens."""
    if len(response) >= budget:
        return [], response[len(response) - budget :] if budget > 0 else []
    keep = budget - len(response)
    return prompt[max(0, len(prompt) - keep) :], response


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _encoder_special(tokenizer: Any) -> tuple[int, int]:
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError(
            "encoder APM input ([CLS] prompt [SEP] response [SEP]) needs a tokenizer with cls and sep; "
            f"this one has cls={tokenizer.cls_token!r} sep={tokenizer.sep_token!r}"
        )
    return int(cls_id), int(sep_id)


def _decoder_bos(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds one by itself (Llama), else [] (GPT-2, SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    config: APMConfig,
    is_decoder: bool,
) -> list[list[int]]:
    """Token ids per (prompt, response), at most `config.max_length` each, not padded.

    Encoder: `[CLS] prompt [SEP] response [SEP]` (the raw prompt string; no token_type_ids are
    passed, so both segments are type 0, as sentence-transformers encodes text). Decoder: the rendered
    conversation (multi-turn prompts parsed into turns; no system text, no attribute line), its
    end-of-turn marker, then eos as the readout token; [bos] first when the tokenizer uses one.

    Truncation (a contract): the start of the prompt goes first; the response's end and the
    special/readout tokens are never cut; only when the response alone does not fit does it lose
    its start. In a decoder input "the prompt" is everything before the response text, role lines
    included, and the response's end includes its end-of-turn marker.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not is_decoder:
        cls_id, sep_id = _encoder_special(tokenizer)
        budget = config.max_length - 3
        out = []
        for p, r in zip(_ids(tokenizer, prompts), _ids(tokenizer, responses), strict=True):
            p, r = _fit(p, r, budget)
            out.append([cls_id, *p, sep_id, *r, sep_id])
        return out

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("decoder APM input needs a tokenizer with an eos token (the readout token)")
    bos = _decoder_bos(tokenizer)
    heads, bodies = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        # full = history + "<extra_id_1>Assistant\n" + response + "\n<extra_id_1>"
        full = render_conversation(conversation_from_row(prompt, response, None))
        body = f"{response}\n{TURN_TOKEN}"
        if not full.endswith(body):
            raise RuntimeError("render_conversation no longer ends with the response and end-of-turn")
        heads.append(full[: -len(body)])
        bodies.append(body)
    budget = config.max_length - len(bos) - 1
    out = []
    for p, r in zip(_ids(tokenizer, heads), _ids(tokenizer, bodies), strict=True):
        p, r = _fit(p, r, budget)
        out.append([*bos, *p, *r, int(eos)])
    return out


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest row: input_ids and attention_mask, both (batch, seq) int64."""
    if not ids:
        raise ValueError("collate: no rows")
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None
) -> list[list[int]]:
    """Indices grouped so that rows * longest_row <= max_tokens (padded size), deterministically.

    Rows are taken longest first (ties by index), so the first batch is the widest one and an
    out-of-memory shows at once. A row longer than max_tokens forms a batch of its own. Every
    index appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens}: allowed: an integer >= 1")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows {max_rows}: allowed: None or an integer >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    width = 0
    for i in order:
        if batches:
            current = batches[-1]
            full = max_rows is not None and len(current) >= max_rows
            if not full and (len(current) + 1) * width <= max_tokens:
                current.append(i)
                continue
        batches.append([i])
        width = max(int(lengths[i]), 1)
    return batches


# --- Targets and loss ----------------------------------------------------------------------------


def targets_from_rows(
    rows: Sequence[Mapping[str, Any]], schema: AttributeSchema = STEERLM
) -> tuple[Tensor, Tensor]:
    """(batch, n_attr) float targets (0 where missing) and (batch, n_attr) float mask (1 = labelled).

    Missing, None and NaN mean "not labelled". Present values are checked against the schema
    (never clamped): a bad value raises naming the row and attribute.
    """
    targets = torch.zeros((len(rows), len(schema.names)), dtype=torch.float32)
    mask = torch.zeros_like(targets)
    for i, row in enumerate(rows):
        for j, name in enumerate(schema.names):
            value = row.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            try:
                targets[i, j] = schema.check_value(name, value)
            except ValueError as exc:
                raise SourceError(f"row {i}: {exc}") from None
            mask[i, j] = 1.0
    return targets, mask


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over labelled entries only; pred, target, mask are (batch, n_attr).

    Masked entries are replaced before the subtraction, so whatever their targets hold (even NaN)
    they contribute exactly zero loss and zero gradient. A batch with no labels returns 0 that is
    still attached to the graph (backward works, gradients are zero).
    """
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"shapes differ: pred {tuple(pred.shape)} target {tuple(target.shape)} mask {tuple(mask.shape)}"
        )
    labelled = mask.bool()
    safe_target = torch.where(labelled, target.to(pred.dtype), torch.zeros_like(pred))
    diff = torch.where(labelled, pred - safe_target, torch.zeros_like(pred))  # (batch, n_attr)
    count = labelled.sum().clamp(min=1).to(pred.dtype)
    return (diff * diff).sum() / count


# --- Inference -----------------------------------------------------------------------------------


def predict(
    model: AttributePredictionModel,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_tokens: int = 8192,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """(n, n_attr) float32 predictions, rows in input order.

    Batches are built by `token_budget_batches` (padded tokens per batch <= max_tokens); the model
    is moved to `device` and run in eval mode under inference_mode, then put back in the mode it
    was in.
    """
    n_attr = len(model.schema.names)
    if len(prompts) == 0:
        return np.zeros((0, n_attr), dtype=np.float32)
    ids = encode_pairs(tokenizer, prompts, responses, model.config, model.is_decoder)
    pad = pad_token_id(tokenizer)
    out = np.zeros((len(ids), n_attr), dtype=np.float32)
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        with torch.inference_mode():
            for batch in token_budget_batches([len(x) for x in ids], max_tokens):
                inputs = collate([ids[i] for i in batch], pad)
                preds = model(
                    inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
                )  # (batch, n_attr)
                out[batch] = preds.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def describe(model: AttributePredictionModel) -> dict[str, Any]:
    """A small summary for logs and MLflow params."""
    return {
        "backbone": model.config.backbone,
        "backbone_type": getattr(model.backbone.config, "model_type", "?"),
        "is_decoder": model.is_decoder,
        "readout": model.readout,
        "max_length": model.config.max_length,
        "schema": model.schema.id,
        "attributes": list(model.schema.names),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


__all__ = [
    "APMConfig",
    "AttributePredictionModel",
    "collate",
    "describe",
    "encode_pairs",
    "is_decoder_config",
    "load_apm_tokenizer",
    "masked_mse",
    "pad_token_id",
    "pool",
    "predict",
    "round_clip",
    "targets_from_rows",
    "token_budget_batches",
]


TRAINED_ATTRIBUTES_FILE = "trained_attributes.json"


def save_trained_attributes(directory: str | Path, names: Sequence[str]) -> None:
    """Record which attributes had labels in training: the others' outputs are untrained."""
    Path(directory, TRAINED_ATTRIBUTES_FILE).write_text(json.dumps(list(names)) + "\n")


def load_trained_attributes(directory: str | Path, schema: AttributeSchema = STEERLM) -> list[str]:
    """The attributes an APM folder was trained on (every schema attribute if not recorded)."""
    path = Path(directory, TRAINED_ATTRIBUTES_FILE)
    if not path.is_file():
        return list(schema.names)
    names = json.loads(path.read_text())
    for name in names:
        schema.index(name)
    return [n for n in schema.names if n in names]
