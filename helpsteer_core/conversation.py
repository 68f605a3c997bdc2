"""Conversations and the NeMo-Aligner-compatible SteerLM template.

One conversation renders as

    <extra_id_0>System\\n{system}\\n
    <extra_id_1>User\\n{prompt}\\n
    <extra_id_1>Assistant\\n<extra_id_2>{attributes}\\n{response}\\n
    <extra_id_1>

(without the line breaks between the pieces). Assistant turns without attributes drop the
`<extra_id_2>` line. `render_segments` returns the text in pieces, each marked trained or not, so
that tokenization can build the loss mask from the same pieces that build the text: only the
response and the end-of-turn marker after it are trained.

HelpSteer2 stores multi-turn prompts as one string, with earlier turns joined by `<extra_id_1>`:
`"{user 1}\\n<extra_id_1>Assistant\\n{assistant 1}\\n<extra_id_1>User\\n{user 2}"`.
`parse_prompt_turns` turns that back into turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from helpsteer_core.attributes import STEERLM, AttributeSchema, format_attributes, parse_attributes

SYSTEM_TOKEN = "<extra_id_0>"
TURN_TOKEN = "<extra_id_1>"
LABEL_TOKEN = "<extra_id_2>"
SPECIAL_TOKENS: tuple[str, ...] = (SYSTEM_TOKEN, TURN_TOKEN, LABEL_TOKEN)
ROLES = ("User", "Assistant")

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConversationFormatError(ValueError):
    """Text that does not follow the conversation format."""


@dataclass(frozen=True)
class Turn:
    role: str  # "User" or "Assistant"
    text: str
    # Only assistant turns carry attributes; None means "unconditioned" (no <extra_id_2> line).
    attributes: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConversationFormatError(f"turn role {self.role!r}; allowed: {', '.join(ROLES)}")
        if self.attributes is not None and self.role != "Assistant":
            raise ConversationFormatError("only Assistant turns carry attributes")


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str = ""
    meta: Mapping[str, object] = field(default_factory=dict)


def parse_prompt_turns(prompt: str) -> list[Turn]:
    """Split a HelpSteer2 prompt into turns; a single-turn prompt is one User turn.

    The first piece is the user's; every later piece starts with its role line. The newline that
    precedes each `<extra_id_1>` belongs to the separator, not to the turn's text.
    """
    pieces = prompt.split(TURN_TOKEN)
    # A single-turn prompt is the user's text as it is; only a separator takes a newline.
    first = pieces[0] if len(pieces) == 1 else _strip_separator_newline(pieces[0])
    turns = [Turn("User", first)]
    for number, piece in enumerate(pieces[1:], start=2):
        role, sep, text = piece.partition("\n")
        if not sep or role not in ROLES:
            raise ConversationFormatError(
                f"prompt turn {number}: expected a role line 'User' or 'Assistant' after "
                f"{TURN_TOKEN}, found {piece[:40]!r}"
            )
        is_last = number == len(pieces)
        turns.append(Turn(role, text if is_last else _strip_separator_newline(text)))
    _check_alternation(turns)
    return turns


def _strip_separator_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _check_alternation(turns: Sequence[Turn]) -> None:
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            raise ConversationFormatError(
                f"turn {i + 1} is {turn.role}, expected {expected}: turns must alternate, starting with User"
            )


def join_prompt_turns(turns: Sequence[Turn]) -> str:
    """The inverse of `parse_prompt_turns` (attributes are not part of a HelpSteer2 prompt)."""
    _check_alternation(turns)
    text = turns[0].text
    for turn in turns[1:]:
        text += f"\n{TURN_TOKEN}{turn.role}\n{turn.text}"
    return text


def conversation_from_row(
    prompt: str,
    response: str,
    attributes: Mapping[str, int | None] | None,
    system: str = "",
) -> Conversation:
    """A HelpSteer row as a conversation: the prompt's turns, then the response as the last turn."""
    turns = parse_prompt_turns(prompt)
    if turns[-1].role != "User":
        raise ConversationFormatError("the prompt's last turn must be the User's")
    present = None
    if attributes is not None:
        present = {k: v for k, v in attributes.items() if v is not None}
    return Conversation(tuple(turns) + (Turn("Assistant", response, present),), system=system)


def assistant_header(attributes: Mapping[str, int] | None, schema: AttributeSchema = STEERLM) -> str:
    """What precedes an assistant response: the role line and, if given, the attribute line."""
    header = f"{TURN_TOKEN}Assistant\n"
    if attributes is not None:
        header += f"{LABEL_TOKEN}{format_attributes(attributes, schema)}\n"
    return header


def render_segments(conversation: Conversation, schema: AttributeSchema = STEERLM) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces; "".join(texts) is the rendered string.

    Trained pieces are each conditioned assistant response plus the newline and end-of-turn
    marker that follow it, so the model learns where to stop. An earlier assistant turn without
    attributes is context only (a turn is trained with its own attributes or not at all, as in
    NeMo-Aligner, where a multi-turn HelpSteer2 prompt is one user turn); the final turn is always
    the trained response.
    """
    pieces: list[tuple[str, bool]] = [(f"{SYSTEM_TOKEN}System\n{conversation.system}\n", False)]
    trained_before = False  # the marker that opens the next turn ends a trained response
    last = len(conversation.turns) - 1
    for index, turn in enumerate(conversation.turns):
        pieces.append((TURN_TOKEN, trained_before))
        if turn.role == "User":
            pieces.append((f"User\n{turn.text}\n", False))
            trained_before = False
        else:
            trained_before = turn.attributes is not None or index == last
            pieces.append((assistant_header(turn.attributes, schema)[len(TURN_TOKEN) :], False))
            pieces.append((f"{turn.text}\n", trained_before))
    if trained_before:
        pieces.append((TURN_TOKEN, True))
    segments: list[tuple[str, bool]] = []
    for text, trained in pieces:
        if segments and segments[-1][1] == trained:
            segments[-1] = (segments[-1][0] + text, trained)
        else:
            segments.append((text, trained))
    return segments


def render_conversation(conversation: Conversation, schema: AttributeSchema = STEERLM) -> str:
    """The full training string. A conversation ending in a user turn ends without the marker."""
    return "".join(text for text, _ in render_segments(conversation, schema))


def render_generation_prompt(
    turns: Sequence[Turn],
    attributes: Mapping[str, int] | None,
    system: str = "",
    schema: AttributeSchema = STEERLM,
) -> str:
    """The prompt a steerable generator continues: history, then the assistant header."""
    if not turns or turns[-1].role != "User":
        raise ConversationFormatError("a generation prompt must end with a User turn")
    history = render_conversation(Conversation(tuple(turns), system=system), schema)
    return history + assistant_header(attributes, schema)


def parse_conversation(text: str, schema: AttributeSchema = STEERLM) -> Conversation:
    """Read back a string written by `render_conversation`."""
    head = f"{SYSTEM_TOKEN}System\n"
    if not text.startswith(head):
        raise ConversationFormatError(f"conversation must start with {head!r}, found {text[:30]!r}")
    body = text[len(head) :]
    system, sep, rest = body.partition(f"\n{TURN_TOKEN}")
    if not sep:
        raise ConversationFormatError("conversation has no turns")
    pieces = rest.split(f"\n{TURN_TOKEN}")
    # A conversation rendered to completion ends with the assistant's end-of-turn marker.
    if pieces and pieces[-1] == "":
        pieces = pieces[:-1]
    turns: list[Turn] = []
    for number, piece in enumerate(pieces, start=1):
        role, sep, content = piece.partition("\n")
        if role not in ROLES or not sep:
            raise ConversationFormatError(f"turn {number}: bad role line {role!r}")
        attributes = None
        if role == "Assistant" and content.startswith(LABEL_TOKEN):
            line, _, content = content[len(LABEL_TOKEN) :].partition("\n")
            attributes = parse_attributes(line, schema)
        if role == "User" and number == len(pieces) and content.endswith("\n"):
            content = content[:-1]
        turns.append(Turn(role, content, attributes))
    _check_alternation(turns)
    return Conversation(tuple(turns), system=system)
