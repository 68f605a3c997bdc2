"""The answers stage's rules (helpsteer_core.answers): the question bank, the requests, which
written answers are kept, cut or rejected, and the stage itself with the packaged SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import model_loads_here

from helpsteer_core.answers import (
    EXAMPLE_QUESTION,
    EXAMPLES,
    STYLES,
    answer_requests,
    cut_to_sentence,
    first_sentences,
    judge_answer,
    pick_questions,
    question_bank,
    repeated_share,
    sentence_ends,
    shorter_rows,
)
from helpsteer_core.prompt_files import read_prompt_file
from helpsteer_core.steering import flesch_kincaid_grade

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EVALUATION_FILES = [
    SHARED / "helpsteer2" / "train_rows_001_060.jsonl",
    SHARED / "mt_bench" / "question.jsonl",
]


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def test_the_bank_has_hundreds_of_distinct_questions_and_a_seeded_sample():
    bank = question_bank()
    assert len(bank) > 400 and len(set(bank)) == len(bank)
    assert all(q.endswith(("?", ".")) and "{" not in q for q in bank)
    assert pick_questions(50, seed=3) == pick_questions(50, seed=3)
    assert pick_questions(50, seed=3) != pick_questions(50, seed=4)
    with pytest.raises(ValueError, match=r"questions: 100000; allowed: 1 to \d+"):
        pick_questions(100_000, seed=0)


def test_no_training_question_is_an_evaluation_prompt():
    missing = [f for f in EVALUATION_FILES if not f.is_file()]
    if missing:
        import os

        if os.environ.get("CI") == "true":
            pytest.fail(f"evaluation prompt files missing in CI: {missing}")
        pytest.skip(f"../shared/data is absent: {missing}")
    evaluation = {_normal(p) for f in EVALUATION_FILES for p in read_prompt_file(f)}
    bank = {_normal(q) for q in question_bank()}
    assert not bank & evaluation
    # Nor is one contained in the other (a bank question quoted inside an evaluation prompt).
    assert not [q for q in bank for e in evaluation if q in e or e in q]


def test_requests_ask_the_plain_question_and_show_the_instruction():
    requests = answer_requests(["What is a comet?"], ["one_sentence", "plain"])
    assert [(r.prompt, r.style, r.shown) for r in requests] == [
        ("What is a comet?", "one_sentence", "What is a comet? " + STYLES["one_sentence"]),
        ("What is a comet?", "plain", "What is a comet?"),
    ]
    with pytest.raises(ValueError, match="styles: \\['poetic'\\]; allowed: a non-empty list of one_sentence"):
        answer_requests(["What is a comet?"], ["poetic"])


def test_a_register_shown_by_example_comes_as_an_earlier_exchange():
    plain, child = answer_requests(["What is a comet?"], ["plain", "child_example"])
    assert plain.turns() == [{"role": "User", "text": "What is a comet?"}]
    assert child.prompt == "What is a comet?"  # AC-SFT trains on the plain question either way
    assert child.turns() == [
        {"role": "User", "text": f"{EXAMPLE_QUESTION} {STYLES['child_example']}"},
        {"role": "Assistant", "text": EXAMPLES["child_example"]},
        {"role": "User", "text": f"What is a comet? {STYLES['child_example']}"},
    ]
    assert set(EXAMPLES) <= set(STYLES)
    assert EXAMPLE_QUESTION not in question_bank()


def test_the_example_answers_climb_in_readability_grade_with_the_register():
    """The examples are what set the registers' order: each reads harder than the one before."""
    order = ["child_example", "simple_example", "technical_example", "specialist_example"]
    assert list(EXAMPLES) == order
    grades = [flesch_kincaid_grade(EXAMPLES[style]) for style in order]
    assert grades == sorted(grades) and grades[0] < 3 < 8 < grades[2]


def test_answers_are_kept_cut_back_to_a_sentence_or_rejected_with_the_reason():
    kept = judge_answer("A comet is an icy body. It orbits the Sun.", True, 64)
    assert (kept.text, kept.cut, kept.reason) == ("A comet is an icy body. It orbits the Sun.", False, None)

    ran_out = "A comet is an icy body that orbits the Sun. Its tail points away from the Sun. Because the"
    cut = judge_answer(ran_out, False, 24)
    expected = "A comet is an icy body that orbits the Sun. Its tail points away from the Sun."
    assert (cut.text, cut.cut, cut.reason) == (expected, True, None)

    no_end = judge_answer("Comets are icy. " + "and the tail grows and grows " * 5, False, 40)
    assert no_end.reason == "did not end within max_new_tokens=40"

    loop = judge_answer("A candle in the corner, " * 12 + "end.", True, 200)
    assert loop.reason is not None and loop.reason.startswith("repetitive: ")
    assert judge_answer("   ", True, 10).reason == "empty answer"


def test_repetition_and_sentence_helpers():
    assert repeated_share("one two three four five six") == 0.0
    assert repeated_share("a b c d a b c d a b c d") == pytest.approx(1 - 4 / 9)
    assert cut_to_sentence('He said "go." Then he') == 'He said "go."'
    assert cut_to_sentence("no end here") == ""
    # A list number or an abbreviation ends no sentence, so nothing is cut to "Steps:\n1."
    assert cut_to_sentence("Steps:\n1. Mix the flour") == ""
    text = "Mix it, e.g. by hand. Then wait!\n\n1. Knead.\n2. Bake? Yes."
    assert [text[:end] for end in sentence_ends(text)] == [
        "Mix it, e.g. by hand.",
        "Mix it, e.g. by hand. Then wait!",
        "Mix it, e.g. by hand. Then wait!\n\n1. Knead.",
        "Mix it, e.g. by hand. Then wait!\n\n1. Knead.\n2. Bake?",
        text,
    ]


def test_shorter_versions_keep_the_opening_sentences_and_say_how_many():
    answer = "A comet is an icy body. It orbits the Sun. Its tail points away from the Sun."
    assert first_sentences(answer, 1) == "A comet is an icy body."
    assert first_sentences(answer, 2) == "A comet is an icy body. It orbits the Sun."
    assert first_sentences(answer, 3) is None and first_sentences(answer, 5) is None  # nothing to cut
    assert first_sentences("One sentence. ", 1) is None  # trailing space is not a second sentence
    rows = [
        {"prompt": "What is a comet?", "response": answer, "style": "plain", "first_sentences": None},
        {"prompt": "Why?", "response": "Because.", "style": "brief", "first_sentences": None},
    ]
    versions = shorter_rows(rows, [4, 2, 1, 2])
    assert [(v["first_sentences"], v["response"]) for v in versions] == [
        (1, "A comet is an icy body."),
        (2, "A comet is an icy body. It orbits the Sun."),
    ]
    assert all(v["prompt"] == "What is a comet?" and v["style"] == "plain" for v in versions)
    assert rows[0]["response"] == answer and rows[0]["first_sentences"] is None  # the whole answer stays


@pytest.mark.slow
def test_the_stage_writes_kept_answers_and_rejects_that_reconcile(ray_head, tmp_path):
    """The packaged SmolLM2 answers 3 questions in 2 styles on a Ray Data actor; every request is
    a kept row or a reject with its reason, and the plain question (no instruction) is the prompt."""
    from ray_jobs.generate_answers import AnswersConfig, run

    out = tmp_path / "answers"
    config = AnswersConfig(
        out=str(out),
        questions=3,
        styles=["one_sentence", "child_example"],
        max_new_tokens=48,
        shorter=[1],
        batch_size=6,
        cpu_dtype="bfloat16",
        tracking={"enabled": False},
    )
    with model_loads_here() as loads:
        stats = run(config)
    assert loads == []  # the actor loaded SmolLM2 (converting it on first use), not the driver
    written = pq.read_table(out / "kept" / "part-000000.parquet").to_pylist()
    rows = [r for r in written if r["first_sentences"] is None]
    versions = [r for r in written if r["first_sentences"] is not None]
    rejects = [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    assert stats["requested"] == 6 == len(rows) + len(rejects) and stats["reconciles"]
    assert stats["kept"] == len(rows) >= 3  # a real model answers most in one or two sentences
    # Shorter versions: the first sentence of each kept answer that has more than one.
    assert stats["shorter_versions"] == len(versions) and stats["rows"] == len(written)
    whole = {(r["prompt"], r["style"]): r["response"] for r in rows}
    for version in versions:
        assert version["first_sentences"] == 1
        assert whole[version["prompt"], version["style"]].startswith(version["response"])
        assert len(version["response"]) < len(whole[version["prompt"], version["style"]])
    questions = set(pick_questions(3, seed=0))
    assert {r["prompt"] for r in rows + rejects} == questions
    assert all(r["response"] and r["style"] in ("one_sentence", "child_example") for r in rows)
    # The row says what the generator was shown: the instruction, and the example answer if any.
    assert {r["example"] for r in rows if r["style"] == "one_sentence"} == {None}
    assert {r["example"] for r in rows if r["style"] == "child_example"} == {EXAMPLES["child_example"]}
    assert all(r["reason"] for r in rejects)
    assert sum(s["kept"] + s["rejected"] for s in stats["by_style"].values()) == 6
    assert json.loads((out / "stats.json").read_text()) == stats
