"""NeMo-Aligner's SteerLM files, read and written: AC-SFT chat JSON Lines and regression JSON Lines.

AC-SFT (what `preprocess_helpsteer2_data.py` and `preprocess_openassistant_data.py` write), one
conversation a line:

    {"conversations": [{"value": "...", "from": "User", "label": null},
                       {"value": "...", "from": "Assistant", "label": "quality:2,toxicity:4"}],
     "system": "...", "mask": "User", "type": "VALUE_TO_TEXT"}

A user turn's label is always null; an assistant turn without attributes has no `label` key, one
with attributes has them as the one attribute string (`attributes.format_attributes`, schema
order), possibly empty. Regression (what `process_to_regression_format.py` writes), one line per
labelled assistant turn:

    {"text": "<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{u}\\n"
             "<extra_id_1>Assistant\\n{a}\\n<extra_id_2>",
     "label": [nine floats in NeMo's order, -100.0 where missing]}

(the text is one string, split here to fit).

Lines are `json.dumps(record, ensure_ascii=False)`, as NeMo-Aligner's scripts write them, so our
output for the same conversations is byte-for-byte theirs. One difference, on purpose: the
regression text uses the conversation's own system text, where NeMo's script always writes its
default (the same text unless a record says otherwise).

Reading gives `Conversation`s; a line that breaks the format raises `NemoFormatError` naming the
field and what is allowed, for the caller to reject.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from helpsteer_core.attributes import (
    NEMO_ATTRIBUTES,
    STEERLM,
    AttributeValueError,
    format_attributes,
    parse_attributes,
)
from helpsteer_core.conversation import (
    DEFAULT_SYSTEM,
    LABEL_TOKEN,
    ROLES,
    SYSTEM_TOKEN,
    TURN_TOKEN,
    Conversation,
    ConversationFormatError,
    Turn,
)

MASK = "User"  # NeMo's `mask`: the role whose turns are not trained
TYPE = "VALUE_TO_TEXT"  # NeMo's `type`: the attribute string conditions the response
MISSING = -100.0  # a regression label nobody gave
ACSFT, REGRESSION = "nemo-acsft", "nemo-regression"


class NemoFormatError(ValueError):
    """A NeMo-Aligner line that does not follow the format; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


# --- Writing -------------------------------------------------------------------------------------


def acsft_record(conversation: Conversation) -> dict[str, Any]:
    """The AC-SFT record of a conversation (keys in NeMo-Aligner's order)."""
    turns: list[dict[str, Any]] = []
    for turn in conversation.turns:
        entry: dict[str, Any] = {"value": turn.text, "from": turn.role}
        if turn.role == "User":
            entry["label"] = None
        elif turn.attributes is not None:
            entry["label"] = format_attributes(turn.attributes, STEERLM)
        turns.append(entry)
    return {
        "conversations": turns,
        "system": conversation.system,
        "mask": conversation.meta.get("mask", MASK),
        "type": conversation.meta.get("type", TYPE),
    }


def acsft_line(conversation: Conversation) -> str:
    return _dumps(acsft_record(conversation))


def regression_records(conversation: Conversation) -> list[dict[str, Any]]:
    """One record per assistant turn with attributes: the text up to and including that turn, and
    its nine labels (-100.0 where missing)."""
    text = f"{SYSTEM_TOKEN}System\n{conversation.system}\n"
    records = []
    for turn in conversation.turns:
        text += f"{TURN_TOKEN}{turn.role}\n{turn.text}\n"
        if turn.attributes:  # None and {} give no row, as an empty NeMo label gives none
            labels = [float(turn.attributes.get(name, MISSING)) for name in NEMO_ATTRIBUTES]
            records.append({"text": text + LABEL_TOKEN, "label": labels})
    return records


def regression_lines(conversation: Conversation) -> list[str]:
    return [_dumps(record) for record in regression_records(conversation)]


# --- Reading -------------------------------------------------------------------------------------


def _check_turns(turns: list[Turn]) -> None:
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            raise NemoFormatError(
                "conversations",
                f"turn {i + 1} is from {turn.role}, expected {expected}: "
                "turns must alternate, starting with User",
            )


def conversation_from_acsft(record: Mapping[str, Any]) -> Conversation:
    """An AC-SFT record as a conversation; `mask` and `type` are kept in `meta` for writing back."""
    if not isinstance(record, Mapping):
        raise NemoFormatError("line", f"expected a JSON object, found {type(record).__name__}")
    entries = record.get("conversations")
    if not isinstance(entries, list) or len(entries) < 2:
        raise NemoFormatError(
            "conversations", "missing or under two turns; allowed: a list of {from, value, label}"
        )
    system = record.get("system", DEFAULT_SYSTEM)
    if not isinstance(system, str):
        raise NemoFormatError("system", f"{system!r:.40}; allowed: a string")
    turns = []
    for number, entry in enumerate(entries, start=1):
        where = f"conversations[{number - 1}]"
        if not isinstance(entry, Mapping):
            raise NemoFormatError(where, "expected an object {from, value, label}")
        role, value = entry.get("from"), entry.get("value")
        if role not in ROLES:
            raise NemoFormatError(f"{where}.from", f"{role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(value, str):
            raise NemoFormatError(f"{where}.value", f"{value!r:.40}; allowed: a string")
        label = entry.get("label")
        if role == "User" and label is not None:
            raise NemoFormatError(f"{where}.label", f"{label!r:.40} on a User turn; allowed: null")
        if label is not None and not isinstance(label, str):
            raise NemoFormatError(f"{where}.label", f"{label!r:.40}; allowed: an attribute string or null")
        try:
            attributes = None if label is None else parse_attributes(label, STEERLM)
        except AttributeValueError as exc:
            raise NemoFormatError(f"{where}.label", str(exc)) from None
        turns.append(Turn(role, value, attributes))
    _check_turns(turns)
    meta = {"source": ACSFT, "mask": record.get("mask", MASK), "type": record.get("type", TYPE)}
    return Conversation(tuple(turns), system=system, meta=meta)


def _regression_labels(raw: Any) -> dict[str, int]:
    if not isinstance(raw, list) or len(raw) != len(NEMO_ATTRIBUTES):
        raise NemoFormatError(
            "label",
            f"{raw!r:.60}; allowed: a list of {len(NEMO_ATTRIBUTES)} numbers ({', '.join(NEMO_ATTRIBUTES)})",
        )
    attributes = {}
    for name, value in zip(NEMO_ATTRIBUTES, raw, strict=True):
        if value == MISSING and not isinstance(value, bool):
            continue
        try:
            attributes[name] = STEERLM.check_value(name, value)
        except AttributeValueError as exc:
            raise NemoFormatError("label", f"{exc} or {MISSING} for missing") from None
    if not attributes:
        raise NemoFormatError(
            "label", f"every value is {MISSING} (missing); a regression row needs one label"
        )
    return attributes


def conversation_from_regression(record: Mapping[str, Any]) -> Conversation:
    """A regression record as a conversation whose last (assistant) turn carries the labels.

    The text is split at every `\\n<extra_id_1>`, so a HelpSteer2 prompt that embeds earlier turns
    becomes those turns; writing the conversation back gives the same text.
    """
    if not isinstance(record, Mapping):
        raise NemoFormatError("line", f"expected a JSON object, found {type(record).__name__}")
    text = record.get("text")
    head, tail = f"{SYSTEM_TOKEN}System\n", f"\n{LABEL_TOKEN}"
    if not isinstance(text, str) or not text.startswith(head) or not text.endswith(tail):
        raise NemoFormatError(
            "text", f"{text!r:.60}; allowed: a string from {head!r} to a response and {tail!r}"
        )
    system, sep, rest = text[len(head) : -len(tail)].partition(f"\n{TURN_TOKEN}")
    if not sep:
        raise NemoFormatError("text", "no turns after the system text")
    turns = []
    for piece in rest.split(f"\n{TURN_TOKEN}"):
        role, sep, value = piece.partition("\n")
        if not sep or role not in ROLES:
            raise NemoFormatError("text", f"a turn starts {piece[:30]!r}; allowed roles: {', '.join(ROLES)}")
        turns.append(Turn(role, value))
    try:
        _check_turns(turns)
        if turns[-1].role != "Assistant":
            raise NemoFormatError("text", "the last turn must be the Assistant's, the one the labels are for")
        turns[-1] = Turn("Assistant", turns[-1].text, _regression_labels(record.get("label")))
    except ConversationFormatError as exc:
        raise NemoFormatError("text", str(exc)) from None
    return Conversation(tuple(turns), system=system, meta={"source": REGRESSION})
