"""The synthetic OpenAssistant trees: the export format our reader (and NeMo-Aligner's) reads, the
same bytes for the same arguments, and labels that are the documented function of the text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpsteer_core.config import ConfigError
from helpsteer_core.conversation_sources import read_source, turn_rows
from helpsteer_core.oasst import OASST_ATTRIBUTES
from helpsteer_core.synthetic import generate, write_synthetic
from helpsteer_core.synthetic_oasst import (
    ANSWERS_PER_PROMPT,
    CREATIVITY,
    HUMOR,
    TOXICITY,
    TREES_FILE,
    generate_trees,
    write_synthetic_oasst,
)

HELPSTEER = str(Path(sys.executable).parent / "helpsteer")


def _planted(text: str, bank: tuple[str, ...]) -> int:
    found = [level for level, sentence in enumerate(bank, start=1) if sentence in text]
    assert len(found) <= 1, text
    return found[0] if found else 0


def test_labels_are_the_planted_sentences_and_quality_is_the_rows_helpfulness(tmp_path):
    write_synthetic_oasst(tmp_path / "oasst", trees=120, seed=4)
    read = read_source(str(tmp_path / "oasst"))
    assert read.input_format == "oasst-trees" and read.counts["rejected"] == 0
    assert read.counts["input_rows"] == read.counts["kept"] == 120 and read.counts["reconciles"]
    rows = [row for unit in read.results for row in turn_rows(unit)]
    helpfulness = {
        (r["prompt"], r["response"]): r["helpfulness"]
        for r in generate(120 * 2 * ANSWERS_PER_PROMPT[1], 4, ANSWERS_PER_PROMPT, 0.0)
    }
    labelled = [r for r in rows if r.get("quality") is not None]
    assert 0.8 * len(rows) < len(labelled) < len(rows)  # ~10% of answers are unreviewed
    for row in labelled:
        text = row["response"]
        assert row["humor"] == _planted(text, HUMOR)
        assert row["creativity"] == _planted(text, CREATIVITY)
        assert row["toxicity"] == _planted(text, TOXICITY)
        # The synthetic answer is the text without the planted sentences.
        plain = text
        for sentence in (*HUMOR, *CREATIVITY, *TOXICITY):
            plain = plain.replace(sentence + " ", "").replace(" " + sentence, "")
        prompt = row["prompt"].rsplit("<extra_id_1>User\n", 1)[-1]
        assert row["quality"] == helpfulness[(prompt, plain)]
    for name in OASST_ATTRIBUTES:  # every level of every label occurs
        assert {r[name] for r in labelled} == set(range(5)), name
    # Conversations: some paths have a second assistant turn, conditioned on the first exchange.
    second = [r for r in rows if r["turn"] == 2]
    assert second and all("<extra_id_1>Assistant\n" in r["prompt"] for r in second)
    assert len({r["conversation_id"] for r in rows}) == 120  # a tree's turns share its id
    assert read.counts["conversations"] > 120  # root-to-leaf paths


def test_same_arguments_same_bytes_and_a_foreign_folder_is_refused(tmp_path):
    first = write_synthetic_oasst(tmp_path / "a", trees=30, seed=2).read_bytes()
    again = subprocess.run(
        [HELPSTEER, "synth", "--format", "oasst", "--trees", "30", "--seed", "2", "--out", tmp_path / "b"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 30 message trees" in again.stdout
    assert (tmp_path / "b" / TREES_FILE).read_bytes() == first
    assert generate_trees(30, 3) != generate_trees(30, 2)
    # Rewriting its own output is allowed; someone else's folder, or the other generator's, is not.
    write_synthetic_oasst(tmp_path / "a", trees=10, seed=2)
    assert len((tmp_path / "a" / TREES_FILE).read_text().splitlines()) == 10
    write_synthetic(tmp_path / "rows", rows=10, seed=1)
    with pytest.raises(ConfigError, match="holds no synthetic-oasst manifest.json"):
        write_synthetic_oasst(tmp_path / "rows", trees=5, seed=1)
    with pytest.raises(ConfigError, match="not this generator's manifest"):
        write_synthetic(tmp_path / "a", rows=10, seed=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="refusing to write"):
        write_synthetic_oasst(tmp_path / "mine", trees=5, seed=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="trees=0: allowed: an integer >= 1"):
        generate_trees(0, 1)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["generator"] == "synthetic-oasst" and manifest["trees"] == 10
