"""Generation for the Serve generator replicas: many requests in one transformers `generate` call.

One call decodes every row of a batch of requests (a request with `n` choices is `n` rows), and
each row keeps its own settings, so requests with different settings batch together:

- sampling: temperature (0 = greedy) and top-p per row, drawn with the row's own seeded RNG by a
  logits processor (Gumbel-max), so a choice's tokens depend on its seed, not on which other
  requests shared the batch or how many rows there were;
- stopping: the trained end-of-turn id, the row's `max_new_tokens` and its stop strings, checked
  every step by a stopping criterion that also decodes the new text; a finished row is padded
  while the others go on, and the call ends when every row is done or cancelled;
- streaming: after every step `emit` receives each request's new text (`ChoiceDelta`s), so a
  streamed response and a non-streamed one are the same text.

Text is decoded without special tokens, with leading and trailing whitespace removed, as
`helpsteer_core.generator.generate_batch` does; text that might be the start of a stop string, a
partial UTF-8 character, or trailing whitespace is held back until it is known to be output.

No ray imports: `serve.deployments.Generator` runs `TransformersEngine.run` in a thread, the
benchmark calls it directly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FinishReason = str  # "stop" (end-of-turn or a stop string), "length" (max_new_tokens), "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    seed: int = 0  # choice i samples with seed + i


@dataclass(frozen=True)
class GenerationJob:
    """One request for the generator: a tokenized prompt and `n` choices to sample."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    request_id: str = ""


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice after a step; `finish_reason` is set on the choice's last delta."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # tokens generated so far (set on the last delta)


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int


def collect(deltas: Sequence[Sequence[ChoiceDelta]], n: int) -> list[Choice]:
    """The choices of one request from all its deltas, in index order."""
    texts = [""] * n
    ends: dict[int, ChoiceDelta] = {}
    for step in deltas:
        for delta in step:
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
                ends[delta.index] = delta
    missing = [i for i in range(n) if i not in ends]
    if missing:
        raise RuntimeError(f"generation ended without finishing choices {missing}")
    return [Choice(i, texts[i], ends[i].finish_reason or "", ends[i].completion_tokens) for i in range(n)]


# --- per-row sampling ------------------------------------------------------------------------------


class _RowSampler:
    """A logits processor that picks each row's token itself and leaves only that token possible.

    `generate` then runs greedy (argmax), so the choice is ours: greedy rows take the argmax,
    sampling rows apply temperature and top-p and draw with their own generator (Gumbel-max).
    """

    def __init__(self, params: Sequence[SamplingParams], seeds: Sequence[int]):
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        self.sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        self.nucleus = [i for i in self.sampled if params[i].top_p < 1.0]
        self.generators = {i: torch.Generator().manual_seed(int(seeds[i])) for i in self.sampled}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # scores: (rows, vocab) float32
        choice = scores.argmax(dim=-1)  # (rows,)
        if self.sampled:
            rows = torch.tensor(self.sampled)
            logits = scores[rows] / self.temperature[rows, None].to(scores.device)  # (sampled, vocab)
            if self.nucleus:
                logits = self._top_p(logits, rows)
            noise = torch.stack(
                [torch.rand(scores.shape[-1], generator=self.generators[i]) for i in self.sampled]
            )
            gumbel = -torch.log(-torch.log(noise.clamp(min=1e-20, max=1.0 - 1e-7))).to(scores.device)
            choice[rows.to(scores.device)] = (logits + gumbel).argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), choice] = 0.0
        return out

    def _top_p(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        top_p = self.top_p[rows].to(logits.device)[:, None]  # (sampled, 1)
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


# --- per-row stopping and decoding ------------------------------------------------------------------


@dataclass
class _Row:
    job: int  # index of the request in the batch
    index: int  # choice index within the request
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    finish_reason: FinishReason | None = None


class _Rows:
    """The stopping criterion: reads each row's new token, decodes, emits deltas, says who is done."""

    def __init__(
        self,
        rows: list[_Row],
        jobs: int,
        tokenizer: Any,
        stop_ids: Sequence[int],
        emit: Callable[[list[list[ChoiceDelta]]], None],
        cancelled: Callable[[int], bool],
    ):
        self.rows, self.jobs, self.tokenizer = rows, jobs, tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.emit, self.cancelled = emit, cancelled

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        step: list[list[ChoiceDelta]] = [[] for _ in range(self.jobs)]
        for row, token in zip(self.rows, new, strict=True):
            if row.finish_reason is not None:
                continue
            if self.cancelled(row.job):
                row.finish_reason = "cancelled"
            elif token in self.stop_ids:
                row.finish_reason = "stop"
            else:
                row.tokens.append(token)
            delta = self._advance(row)
            if delta is not None:
                step[row.job].append(delta)
        self.emit(step)
        return torch.tensor([r.finish_reason is not None for r in self.rows], device=input_ids.device)

    def _advance(self, row: _Row) -> ChoiceDelta | None:
        text = self.tokenizer.decode(
            row.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        ).lstrip()
        if row.finish_reason is None:
            cut = _first_stop(text, row.params.stop)
            if cut is not None:
                text, row.finish_reason = text[:cut], "stop"
            elif len(row.tokens) >= row.params.max_new_tokens:
                row.finish_reason = "length"
        if row.finish_reason is not None:
            visible = text.rstrip()
        else:
            visible = text[: len(text) - _held_back(text, row.params.stop)]
        if not visible.startswith(row.sent):  # a decoder that rewrote earlier text: keep what was sent
            visible = row.sent
        delta = visible[len(row.sent) :]
        row.sent = visible
        if not delta and row.finish_reason is None:
            return None
        return ChoiceDelta(row.index, delta, row.finish_reason, len(row.tokens) if row.finish_reason else 0)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still change: whitespace, a partial character, a stop's start."""
    held = len(text) - len(text.rstrip())
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence decodes as the replacement character
        held = max(held, len(text) - len(text.rstrip("\ufffd")))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                held = max(held, size)
                break
    return held


# --- the engine ------------------------------------------------------------------------------------


class TransformersEngine:
    """A causal LM and its tokenizer; `run` generates a batch of jobs (blocking, one at a time)."""

    def __init__(self, model: Any, tokenizer: Any, stop_ids: Sequence[int]):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, list(stop_ids)
        self._lock = threading.Lock()  # one generate at a time: a model is not re-entrant

    @torch.no_grad()
    def run(
        self,
        jobs: Sequence[GenerationJob],
        emit: Callable[[list[list[ChoiceDelta]]], None],
        cancelled: Callable[[int], bool] = lambda job: False,
    ) -> None:
        """Generate every choice of every job; `emit(step)` gets per-job deltas after each step.

        `cancelled(job_index)` is asked every step; a cancelled job's rows stop (finish_reason
        "cancelled") and the call returns early when nothing else is left.
        """
        from transformers import LogitsProcessorList, StoppingCriteriaList

        rows = [_Row(j, i, job.params) for j, job in enumerate(jobs) for i in range(job.n)]
        if not rows:
            return
        prompts = [jobs[r.job].prompt_ids for r in rows]
        seeds = [r.params.seed + r.index for r in rows]
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        criterion = _Rows(rows, len(jobs), self.tokenizer, self.stop_ids, emit, cancelled)
        with self._lock:
            self.model.generate(
                input_ids=input_ids.to(self.model.device),  # (rows, width), left-padded
                attention_mask=attention.to(self.model.device),
                max_new_tokens=max(r.params.max_new_tokens for r in rows),
                do_sample=False,  # _RowSampler has already chosen: argmax takes its token
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=LogitsProcessorList([_RowSampler([r.params for r in rows], seeds)]),
                stopping_criteria=StoppingCriteriaList([criterion]),
                eos_token_id=self.stop_ids,
                pad_token_id=pad,
            )
        # Rows still open ran out of the shared max_new_tokens at the same step as the criterion.
        final: list[list[ChoiceDelta]] = [[] for _ in jobs]
        for row in rows:
            if row.finish_reason is None:
                row.finish_reason = "length"
                delta = criterion._advance(row)
                if delta is not None:
                    final[row.job].append(delta)
        if any(final):
            emit(final)

    def generate(self, job: GenerationJob) -> list[Choice]:
        """One job, no batching, no streaming: the direct in-process call."""
        steps: list[list[ChoiceDelta]] = []
        self.run([job], lambda step: steps.append(step[0]))
        return collect(steps, job.n)
