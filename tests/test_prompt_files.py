"""Real-style prompt files: HelpSteer2 rows, FastChat MT-Bench questions and plain text give their
distinct prompts in order, several files interleave, and a bad line is named by file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shared_data import shared_file

from helpsteer_core.conversation import TURN_TOKEN, parse_prompt_turns
from helpsteer_core.prompt_files import read_prompt_file, real_prompts

HELPSTEER2 = "helpsteer2/train_rows_001_060.jsonl"
MT_BENCH = "mt_bench/question.jsonl"


def test_helpsteer2_rows_give_their_30_distinct_prompts_in_file_order() -> None:
    source = shared_file(HELPSTEER2)
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    prompts = read_prompt_file(source)
    assert len(rows) == 60 and len(prompts) == 30  # two responses per prompt
    assert prompts == list(dict.fromkeys(r["prompt"] for r in rows))
    for prompt in prompts:  # kept raw: the evaluation parses the turns itself
        assert parse_prompt_turns(prompt)[-1].role == "User"


def test_mt_bench_gives_the_first_turn_of_its_80_questions() -> None:
    source = shared_file(MT_BENCH)
    questions = [json.loads(line) for line in source.read_text().splitlines()]
    prompts = read_prompt_file(source)
    assert len(prompts) == 80
    assert prompts == [q["turns"][0] for q in questions]
    assert questions[0]["turns"][1] not in prompts


def test_files_interleave_round_robin_and_skip_repeats(tmp_path: Path) -> None:
    first = tmp_path / "a.txt"
    first.write_text("a1\n\na2\na3\na1\nshared\n")
    second = tmp_path / "b.jsonl"
    second.write_text("\n".join(json.dumps({"prompt": p}) for p in ["b1", "shared", "b3"]) + "\n")
    assert read_prompt_file(first) == ["a1", "a2", "a3", "shared"]
    assert real_prompts([first, second], 6) == ["a1", "b1", "a2", "shared", "a3", "b3"]
    assert real_prompts([first, second], 3) == ["a1", "b1", "a2"]
    with pytest.raises(
        ValueError, match=r"6 distinct prompts in .*a.txt \(4\), .*b.jsonl \(3\), fewer than the 7"
    ):
        real_prompts([first, second], 7)


def test_the_first_prompts_of_two_shared_files_mix_both_sources() -> None:
    helpsteer2, mt_bench = shared_file(HELPSTEER2), shared_file(MT_BENCH)
    mixed = real_prompts([helpsteer2, mt_bench], 6)
    assert mixed[0::2] == read_prompt_file(helpsteer2)[:3]
    assert mixed[1::2] == read_prompt_file(mt_bench)[:3]
    assert len(real_prompts([helpsteer2, mt_bench], 110)) == 110
    with pytest.raises(
        ValueError, match=r"110 distinct prompts in .*train_rows_001_060.jsonl \(30\).*fewer than the 111"
    ):
        real_prompts([helpsteer2, mt_bench], 111)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"prompt": ""}', "field `prompt`"),
        ('{"prompt": 3}', "field `prompt`"),
        ('{"turns": []}', "field `turns`"),
        ('{"turns": ["fine", 2]}', "field `turns`"),
        ('{"question": "what?"}', "needs a non-empty `prompt`"),
        ("not json", "not JSON"),
    ],
)
def test_a_bad_line_is_named_by_file_line_and_field(tmp_path: Path, line: str, field: str) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "A good first row."}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:3: ") as error:
        read_prompt_file(source)
    assert field in str(error.value)
    assert "`prompt` string or a `turns` list of strings (HelpSteer2 rows or FastChat question.jsonl)" in str(
        error.value
    )


def test_a_broken_multi_turn_prompt_is_named_too(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": f"Hi\n{TURN_TOKEN}Robot\nhello"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: field `prompt`: prompt turn 2"):
        read_prompt_file(source)


def test_missing_unknown_and_empty_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_prompt_file(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        real_prompts([tmp_path / "nowhere.txt"], 1)
    (tmp_path / "prompts.csv").write_text("a\n")
    with pytest.raises(
        ValueError, match=r"prompts.csv: unknown prompt file type '.csv'; allowed: .jsonl, .txt"
    ):
        read_prompt_file(tmp_path / "prompts.csv")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
