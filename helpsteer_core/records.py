"""The HelpSteer record and its validation.

A row is valid when `prompt` and `response` are non-empty strings and every attribute column that
is present holds an integer in the schema's range (missing or null means "not labelled"). Every
other column is an extra that is carried through untouched. `validate_row` never fixes a row: a
bad row raises `RowError`, which names the field, the value and what is allowed, so the caller can
put the row in the rejects with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from helpsteer_core.attributes import STEERLM, AttributeSchema, AttributeValueError
from helpsteer_core.conversation import ConversationFormatError, parse_prompt_turns

TEXT_FIELDS = ("prompt", "response")
# Columns the readers add to say where a row came from; they describe this read, so an input
# column of the same name is replaced (documented in the README's data section).
PROVENANCE_FIELDS = ("input_file", "input_line")


class RowError(ValueError):
    """A row that cannot be used, with the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Record:
    prompt: str
    response: str
    # Every schema attribute, None where the row has no label.
    attributes: Mapping[str, int | None]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def labelled(self) -> dict[str, int]:
        return {k: v for k, v in self.attributes.items() if v is not None}


def _preview(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_texts(row: Mapping[str, Any]) -> dict[str, str]:
    """The row's prompt and response, checked (non-empty strings, a well-formed multi-turn
    prompt); raise `RowError` naming the field otherwise (the filter stage and relabel)."""
    texts: dict[str, str] = {}
    for name in TEXT_FIELDS:
        if name not in row or row[name] is None:
            raise RowError(name, "missing; every row needs a non-empty string 'prompt' and 'response'")
        value = row[name]
        if not isinstance(value, str):
            raise RowError(
                name, f"{_preview(value)} has type {type(value).__name__}; allowed: a non-empty string"
            )
        if value.strip() == "":
            raise RowError(name, "is empty; allowed: a non-empty string")
        texts[name] = value
    try:
        parse_prompt_turns(texts["prompt"])
    except ConversationFormatError as exc:
        raise RowError("prompt", f"multi-turn format: {exc}") from None
    return texts


def validate_row(row: Mapping[str, Any], schema: AttributeSchema = STEERLM) -> Record:
    """Check one parsed row; raise `RowError` on the first problem found."""
    if not isinstance(row, Mapping):
        raise RowError("row", f"expected a JSON object, found {type(row).__name__}")
    texts = check_texts(row)
    attributes: dict[str, int | None] = {}
    for name in schema.names:
        value = row.get(name)
        if value is None or (isinstance(value, float) and value != value):  # NaN = missing
            attributes[name] = None
            continue
        try:
            attributes[name] = schema.check_value(name, value)
        except AttributeValueError as exc:
            raise RowError(name, str(exc)) from None
    extra = {
        k: v
        for k, v in row.items()
        if k not in TEXT_FIELDS and k not in schema.names and k not in PROVENANCE_FIELDS
    }
    return Record(texts["prompt"], texts["response"], attributes, extra)


def parse_json_line(line: str) -> Mapping[str, Any]:
    """Parse one JSON Lines row; raise `RowError` for text that is not a JSON object."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RowError("line", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise RowError("line", f"expected a JSON object, found {type(value).__name__}")
    return value
