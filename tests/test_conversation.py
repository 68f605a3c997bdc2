"""The SteerLM conversation template: golden strings, the loss-mask segments, HelpSteer2 multi-turn
prompts, and the round trips between text and turns."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpsteer_core.attributes import HELPSTEER, STEERLM
from helpsteer_core.conversation import (
    LABEL_TOKEN,
    SPECIAL_TOKENS,
    TURN_TOKEN,
    Conversation,
    ConversationFormatError,
    Turn,
    conversation_from_row,
    join_prompt_turns,
    parse_conversation,
    parse_prompt_turns,
    render_conversation,
    render_generation_prompt,
    render_segments,
)

ATTRS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}
ATTR_LINE = "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2"
SYSTEM = "You are a careful assistant."


def single_turn() -> Conversation:
    return conversation_from_row("What is 2 + 2?", "It is 4.", ATTRS, system=SYSTEM)


def multi_turn() -> Conversation:
    return Conversation(
        (
            Turn("User", "Hi"),
            Turn("Assistant", "Hello!", {"helpfulness": 3, "verbosity": 1}),
            Turn("User", "Tell me a joke"),
            Turn("Assistant", "No.", {"humor": 0}),
        ),
        system="S",
    )


# --- golden strings ---------------------------------------------------------------------------


def test_render_single_turn_golden() -> None:
    assert render_conversation(single_turn()) == (
        "<extra_id_0>System\nYou are a careful assistant.\n"
        "<extra_id_1>User\nWhat is 2 + 2?\n"
        "<extra_id_1>Assistant\n"
        "<extra_id_2>helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2\n"
        "It is 4.\n"
        "<extra_id_1>"
    )


def test_render_multi_turn_golden() -> None:
    assert render_conversation(multi_turn()) == (
        "<extra_id_0>System\nS\n"
        "<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\n<extra_id_2>helpfulness:3,verbosity:1\nHello!\n"
        "<extra_id_1>User\nTell me a joke\n"
        "<extra_id_1>Assistant\n<extra_id_2>humor:0\nNo.\n"
        "<extra_id_1>"
    )


def test_render_unconditioned_assistant_has_no_label_line() -> None:
    conversation = Conversation((Turn("User", "q"), Turn("Assistant", "a")))
    text = render_conversation(conversation)
    assert text == "<extra_id_0>System\n\n<extra_id_1>User\nq\n<extra_id_1>Assistant\na\n<extra_id_1>"
    assert LABEL_TOKEN not in text


def test_render_ending_with_user_has_no_end_marker() -> None:
    conversation = Conversation((Turn("User", "q"),), system="S")
    assert render_conversation(conversation) == "<extra_id_0>System\nS\n<extra_id_1>User\nq\n"


def test_conversation_from_row_drops_missing_attributes_and_uses_prompt_turns() -> None:
    prompt = "q1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nq2"
    conversation = conversation_from_row(prompt, "a2", {"helpfulness": 2, "verbosity": None})
    assert conversation.turns == (
        Turn("User", "q1"),
        Turn("Assistant", "a1"),
        Turn("User", "q2"),
        Turn("Assistant", "a2", {"helpfulness": 2}),
    )
    assert render_conversation(conversation) == (
        "<extra_id_0>System\n\n"
        "<extra_id_1>User\nq1\n"
        "<extra_id_1>Assistant\na1\n"
        "<extra_id_1>User\nq2\n"
        "<extra_id_1>Assistant\n<extra_id_2>helpfulness:2\na2\n"
        "<extra_id_1>"
    )


def test_conversation_from_row_without_attributes_is_unconditioned() -> None:
    conversation = conversation_from_row("q", "a", None)
    assert conversation.turns[-1] == Turn("Assistant", "a", None)


def test_render_with_helpsteer_schema_rejects_steerlm_only_attribute() -> None:
    conversation = Conversation((Turn("User", "q"), Turn("Assistant", "a", {"humor": 1})))
    assert "<extra_id_2>humor:1\n" in render_conversation(conversation, STEERLM)
    with pytest.raises(ValueError, match="unknown attribute 'humor'"):
        render_conversation(conversation, HELPSTEER)


# --- segments and the loss mask ----------------------------------------------------------------


@pytest.mark.parametrize("conversation", [single_turn(), multi_turn()], ids=["single", "multi"])
def test_segments_concatenate_to_render(conversation: Conversation) -> None:
    segments = render_segments(conversation)
    assert "".join(text for text, _ in segments) == render_conversation(conversation)
    # Neighbouring pieces with the same flag are merged, so flags alternate.
    flags = [trained for _, trained in segments]
    assert all(a != b for a, b in zip(flags, flags[1:], strict=False))


@pytest.mark.parametrize("conversation", [single_turn(), multi_turn()], ids=["single", "multi"])
def test_only_assistant_responses_and_their_end_marker_are_trained(
    conversation: Conversation,
) -> None:
    segments = render_segments(conversation)
    trained = [text for text, is_trained in segments if is_trained]
    responses = [t.text for t in conversation.turns if t.role == "Assistant"]
    assert trained == [f"{r}\n{TURN_TOKEN}" for r in responses]
    untrained = "".join(text for text, is_trained in segments if not is_trained)
    assert conversation.system in untrained
    for turn in conversation.turns:
        if turn.role == "User":
            assert f"User\n{turn.text}\n" in untrained
    for text in trained:
        assert LABEL_TOKEN not in text
        assert "User\n" not in text
        assert "System" not in text


def test_segments_single_turn_golden() -> None:
    assert render_segments(single_turn()) == [
        (
            "<extra_id_0>System\nYou are a careful assistant.\n<extra_id_1>User\nWhat is 2 + 2?\n"
            f"<extra_id_1>Assistant\n<extra_id_2>{ATTR_LINE}\n",
            False,
        ),
        ("It is 4.\n<extra_id_1>", True),
    ]


def test_generation_prompt_ends_with_assistant_header_and_attribute_line() -> None:
    turns = [Turn("User", "What is 2 + 2?")]
    prompt = render_generation_prompt(turns, ATTRS, system=SYSTEM)
    assert prompt.endswith(f"<extra_id_1>Assistant\n<extra_id_2>{ATTR_LINE}\n")
    # It is exactly the untrained prefix of the training string for the same turn.
    training = render_conversation(single_turn())
    assert training == prompt + "It is 4.\n<extra_id_1>"


def test_generation_prompt_without_attributes_ends_with_role_line() -> None:
    prompt = render_generation_prompt([Turn("User", "q")], None)
    assert prompt == "<extra_id_0>System\n\n<extra_id_1>User\nq\n<extra_id_1>Assistant\n"


@pytest.mark.parametrize("turns", [[], [Turn("User", "q"), Turn("Assistant", "a")]])
def test_generation_prompt_must_end_with_user(turns: list[Turn]) -> None:
    with pytest.raises(ConversationFormatError, match="must end with a User turn"):
        render_generation_prompt(turns, ATTRS)


# --- HelpSteer2 multi-turn prompts ---------------------------------------------------------------


def test_parse_prompt_turns_helpsteer2_multi_turn() -> None:
    turns = parse_prompt_turns("q1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nq2")
    assert turns == [Turn("User", "q1"), Turn("Assistant", "a1"), Turn("User", "q2")]


def test_parse_prompt_turns_keeps_inner_newlines() -> None:
    turns = parse_prompt_turns("line 1\nline 2\n\n<extra_id_1>Assistant\n\nA\n<extra_id_1>User\nq2\n")
    assert turns == [Turn("User", "line 1\nline 2\n"), Turn("Assistant", "\nA"), Turn("User", "q2\n")]


def test_parse_prompt_turns_single_turn() -> None:
    assert parse_prompt_turns("just a question") == [Turn("User", "just a question")]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("q1\n<extra_id_1>Bot\na1", "prompt turn 2: expected a role line 'User' or 'Assistant'"),
        ("q1\n<extra_id_1>Assistant", "prompt turn 2: expected a role line"),
        ("q1\n<extra_id_1>User\nq2", "turn 2 is User, expected Assistant"),
        ("q1\n<extra_id_1>Assistant\na1\n<extra_id_1>Assistant\na2", "turn 3 is Assistant, expected User"),
    ],
)
def test_parse_prompt_turns_errors(prompt: str, message: str) -> None:
    with pytest.raises(ConversationFormatError, match=message):
        parse_prompt_turns(prompt)


def test_conversation_from_row_rejects_prompt_ending_with_assistant() -> None:
    with pytest.raises(ConversationFormatError, match="last turn must be the User's"):
        conversation_from_row("q1\n<extra_id_1>Assistant\na1", "r", None)


def test_join_prompt_turns_golden_and_alternation() -> None:
    turns = [Turn("User", "q1"), Turn("Assistant", "a1"), Turn("User", "q2")]
    assert join_prompt_turns(turns) == "q1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nq2"
    with pytest.raises(ConversationFormatError, match="turn 1 is Assistant, expected User"):
        join_prompt_turns([Turn("Assistant", "a")])


def test_turn_rejects_bad_role_and_user_attributes() -> None:
    with pytest.raises(ConversationFormatError, match="turn role 'System'; allowed: User, Assistant"):
        Turn("System", "x")
    with pytest.raises(ConversationFormatError, match="only Assistant turns carry attributes"):
        Turn("User", "x", {"helpfulness": 1})


# Texts that cannot contain the special tokens (they are the format's delimiters).
plain_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: not any(tok in s for tok in SPECIAL_TOKENS)
)
attribute_values = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(STEERLM.names), st.integers(min_value=0, max_value=4)),
)


@st.composite
def alternating_turns(draw: st.DrawFn, with_attributes: bool) -> list[Turn]:
    n = draw(st.integers(min_value=1, max_value=6))
    turns = []
    for i in range(n):
        role = "User" if i % 2 == 0 else "Assistant"
        attrs = draw(attribute_values) if with_attributes and role == "Assistant" else None
        turns.append(Turn(role, draw(plain_text), attrs))
    return turns


@given(alternating_turns(with_attributes=False))
def test_parse_prompt_turns_inverts_join(turns: list[Turn]) -> None:
    assert parse_prompt_turns(join_prompt_turns(turns)) == turns


def test_single_turn_prompt_keeps_trailing_newline() -> None:
    assert parse_prompt_turns("What is this?\n") == [Turn("User", "What is this?\n")]


def test_helpsteer2_sample_prompts_survive_parse_and_join(helpsteer2_sample) -> None:
    rows = [json.loads(line) for line in helpsteer2_sample.read_text().splitlines()]
    assert len(rows) == 60
    changed = [
        r["prompt"][-30:] for r in rows if join_prompt_turns(parse_prompt_turns(r["prompt"])) != r["prompt"]
    ]
    assert changed == []


def test_helpsteer2_sample_renders_and_parses_back(helpsteer2_sample) -> None:
    for line in helpsteer2_sample.read_text().splitlines():
        row = json.loads(line)
        attrs = {name: row[name] for name in HELPSTEER.names}
        conversation = conversation_from_row(row["prompt"], row["response"], attrs, system=SYSTEM)
        text = render_conversation(conversation, HELPSTEER)
        assert text.endswith(f"<extra_id_2>{_line(attrs)}\n{row['response']}\n<extra_id_1>")
        assert parse_conversation(text, HELPSTEER) == conversation


def _line(attrs: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in attrs.items())


# --- reading a rendered conversation back ----------------------------------------------------------


@given(alternating_turns(with_attributes=True), plain_text)
def test_parse_conversation_inverts_render(turns: list[Turn], system: str) -> None:
    conversation = Conversation(tuple(turns), system=system)
    assert parse_conversation(render_conversation(conversation)) == conversation


def test_parse_conversation_golden_multi_turn() -> None:
    assert parse_conversation(render_conversation(multi_turn())) == multi_turn()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<extra_id_1>User\nq\n", "conversation must start with '<extra_id_0>System\\\\n'"),
        ("<extra_id_0>System\nS", "conversation has no turns"),
        ("<extra_id_0>System\nS\n<extra_id_1>Robot\nq\n", "turn 1: bad role line 'Robot'"),
        ("<extra_id_0>System\nS\n<extra_id_1>User", "turn 1: bad role line 'User'"),
        (
            "<extra_id_0>System\nS\n<extra_id_1>Assistant\na\n<extra_id_1>",
            "turn 1 is Assistant, expected User",
        ),
        (
            "<extra_id_0>System\nS\n<extra_id_1>User\nq\n<extra_id_1>User\nq\n",
            "turn 2 is User, expected Assistant",
        ),
    ],
)
def test_parse_conversation_errors(text: str, message: str) -> None:
    with pytest.raises(ConversationFormatError, match=message):
        parse_conversation(text)


def test_parse_conversation_bad_attribute_line_names_the_attribute() -> None:
    text = (
        "<extra_id_0>System\n\n<extra_id_1>User\nq\n"
        "<extra_id_1>Assistant\n<extra_id_2>helpfulness:7\na\n<extra_id_1>"
    )
    with pytest.raises(ValueError, match="'helpfulness' = 7 is outside the range"):
        parse_conversation(text)
