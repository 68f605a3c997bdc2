"""NeMo-Aligner's AC-SFT and regression files: what we write for the shared HelpSteer2 rows and the
OpenAssistant fixture is NeMo-Aligner's own output byte for byte, reading those files back gives the
same conversations, and a line that breaks the format is named by its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shared_data import shared_file

from helpsteer_core.conversation import DEFAULT_SYSTEM, Conversation, Turn
from helpsteer_core.conversation_sources import read_source
from helpsteer_core.nemo_format import (
    NemoFormatError,
    acsft_line,
    conversation_from_acsft,
    conversation_from_regression,
    regression_lines,
)


def read(source: Path) -> tuple[list[Conversation], dict]:
    found = read_source(str(source))
    return found.conversations, found.counts


GOLDEN = {
    ("helpsteer2/train_rows_001_060.jsonl", "acsft"): "nemo_aligner/helpsteer2_rows_001_060.acsft.jsonl",
    (
        "helpsteer2/train_rows_001_060.jsonl",
        "regression",
    ): "nemo_aligner/helpsteer2_rows_001_060.regression.jsonl",
    ("oasst/fixture_a.trees.jsonl", "acsft"): "nemo_aligner/oasst_fixture_a.acsft.jsonl",
    ("oasst/fixture_a.trees.jsonl", "regression"): "nemo_aligner/oasst_fixture_a.regression.jsonl",
}


def written(conversations: list[Conversation], kind: str) -> bytes:
    if kind == "acsft":
        lines = [acsft_line(c) for c in conversations]
    else:
        lines = [line for c in conversations for line in regression_lines(c)]
    return "".join(line + "\n" for line in lines).encode("utf-8")


@pytest.mark.parametrize(("source", "kind"), list(GOLDEN))
def test_our_output_is_nemo_aligners_byte_for_byte(source: str, kind: str) -> None:
    conversations, counts = read(shared_file(source))
    assert counts["rejected"] == 0 and counts["filtered"] == 0
    assert written(conversations, kind) == shared_file(GOLDEN[(source, kind)]).read_bytes()


@pytest.mark.parametrize(("source", "kind"), list(GOLDEN))
def test_reading_nemo_files_back_gives_the_same_rows(source: str, kind: str) -> None:
    golden = shared_file(GOLDEN[(source, kind)])
    back, counts = read(golden)
    assert counts["kept"] == len(golden.read_text(encoding="utf-8").splitlines()) and counts["rejected"] == 0
    assert written(back, kind) == golden.read_bytes()
    if kind == "acsft":  # the same conversations as the original source gives, turn by turn
        original, _ = read(shared_file(source))
        assert [(c.turns, c.system) for c in back] == [(c.turns, c.system) for c in original]


def test_acsft_file_gives_the_regression_file() -> None:
    for name in ("helpsteer2_rows_001_060", "oasst_fixture_a"):
        conversations, _ = read(shared_file(f"nemo_aligner/{name}.acsft.jsonl"))
        assert (
            written(conversations, "regression")
            == shared_file(f"nemo_aligner/{name}.regression.jsonl").read_bytes()
        )


def test_a_multi_turn_helpsteer2_prompt_round_trips_through_regression_text() -> None:
    prompt = "Name a fruit.\n<extra_id_1>Assistant\nApple.\n<extra_id_1>User\nAnother?"
    conversation = Conversation(
        (Turn("User", prompt), Turn("Assistant", "Pear.", {"helpfulness": 3, "verbosity": 1})),
        system=DEFAULT_SYSTEM,
    )
    (line,) = regression_lines(conversation)
    back = conversation_from_regression(json.loads(line))
    assert [t.role for t in back.turns] == ["User", "Assistant", "User", "Assistant"]
    assert back.turns[-1].attributes == {"helpfulness": 3, "verbosity": 1}
    assert regression_lines(back) == [line]
    assert json.loads(line)["label"] == [-100.0] * 4 + [3.0, -100.0, -100.0, -100.0, 1.0]


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        (
            {"conversations": [{"from": "User", "value": "q"}, {"from": "Bot", "value": "a"}]},
            "conversations[1].from",
            "allowed: User, Assistant",
        ),
        (
            {
                "conversations": [
                    {"from": "User", "value": "q", "label": "quality:2"},
                    {"from": "Assistant", "value": "a"},
                ]
            },
            "conversations[0].label",
            "allowed: null",
        ),
        (
            {
                "conversations": [
                    {"from": "User", "value": "q"},
                    {"from": "Assistant", "value": "a", "label": "quality:7"},
                ]
            },
            "conversations[1].label",
            "0..4",
        ),
        (
            {"conversations": [{"from": "Assistant", "value": "a"}, {"from": "User", "value": "q"}]},
            "conversations",
            "alternate",
        ),
    ],
)
def test_bad_acsft_lines_name_the_field(record: dict, field: str, words: str) -> None:
    with pytest.raises(NemoFormatError) as caught:
        conversation_from_acsft(record)
    assert caught.value.field == field and words in str(caught.value)


@pytest.mark.parametrize(
    ("label", "words"),
    [
        ([2.5] + [-100.0] * 8, "not an integer"),
        ([2.0] * 8, "a list of 9 numbers"),
        ([-100.0] * 9, "needs one label"),
        ([9.0] + [-100.0] * 8, "outside the range"),
    ],
)
def test_bad_regression_labels_are_refused_never_rounded(label: list, words: str) -> None:
    text = (
        f"<extra_id_0>System\n{DEFAULT_SYSTEM}\n<extra_id_1>User\nq\n<extra_id_1>Assistant\na\n<extra_id_2>"
    )
    with pytest.raises(NemoFormatError) as caught:
        conversation_from_regression({"text": text, "label": label})
    assert caught.value.field == "label" and words in str(caught.value)
