"""The synthetic generator: determinism, shape, and that every planted signal is in the text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from helpsteer_core import synthetic as syn
from helpsteer_core.attributes import HELPSTEER, HELPSTEER_ATTRIBUTES, load_and_check_schema
from helpsteer_core.conversation import parse_prompt_turns

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planned() -> list[tuple[dict, syn.ResponsePlan]]:
    return syn.generate_with_plans(2000, seed=11)


@pytest.fixture(scope="module")
def rows(planned: list[tuple[dict, syn.ResponsePlan]]) -> list[dict]:
    return [row for row, _ in planned]


def _prompt_groups(rows: list[dict]) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for row in rows:
        if groups and groups[-1][0]["prompt"] == row["prompt"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _strip_connective(sentence: str) -> str:
    for connective in syn.CONNECTIVES:
        if sentence.startswith(connective + ", "):
            rest = sentence[len(connective) + 2 :]
            return rest[:1].upper() + rest[1:]
    return sentence


def _starts_with_connective(sentence: str) -> bool:
    return any(sentence.startswith(c + ", ") for c in syn.CONNECTIVES)


# --- determinism and shape -------------------------------------------------------------------


def test_same_seed_same_rows_and_different_seed_different_rows() -> None:
    assert syn.generate(300, seed=5) == syn.generate(300, seed=5)
    other = syn.generate(300, seed=6)
    assert [r["response"] for r in other] != [r["response"] for r in syn.generate(300, seed=5)]


def test_rows_are_identical_in_another_process() -> None:
    # String hashing is salted per process; the generator must not depend on it.
    code = (
        "import json, sys; from helpsteer_core.synthetic import generate; "
        "sys.stdout.write(json.dumps(generate(300, seed=5), ensure_ascii=False))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == syn.generate(300, seed=5)


@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_exactly_the_requested_number_of_rows(n: int) -> None:
    assert len(syn.generate(n, seed=3)) == n


def test_fewer_rows_are_a_prefix_of_more_rows() -> None:
    assert syn.generate(500, seed=4) == syn.generate(1200, seed=4)[:500]


def test_row_fields_and_ids(rows: list[dict]) -> None:
    expected = {"id", "prompt", "response", "source", *HELPSTEER_ATTRIBUTES}
    for row in rows:
        assert set(row) == expected
        assert row["source"] == "synthetic"
        assert isinstance(row["prompt"], str) and isinstance(row["response"], str)
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids)
    assert ids[123] == "syn-s11-000123"


def test_several_responses_per_prompt_and_no_repeated_pairs(rows: list[dict]) -> None:
    groups = _prompt_groups(rows)
    sizes = [len(g) for g in groups]
    assert all(2 <= s <= 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
    assert set(sizes[:-1]) == {2, 3, 4}
    # A prompt text is one prompt: it never comes back in a later group.
    assert len({g[0]["prompt"] for g in groups}) == len(groups)
    # Distinct responses per prompt, so de-duplication never drops a synthetic row.
    assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)


def test_responses_per_prompt_range_is_honoured() -> None:
    one = syn.generate(200, seed=2, responses_per_prompt=(1, 1))
    assert len({r["prompt"] for r in one}) == 200
    three = _prompt_groups(syn.generate(300, seed=2, responses_per_prompt=(3, 3)))
    assert [len(g) for g in three] == [3] * 100


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rows": -1}, "rows"),
        ({"seed": "1"}, "seed"),
        ({"responses_per_prompt": (3, 2)}, "responses_per_prompt"),
        ({"responses_per_prompt": (0, 2)}, "responses_per_prompt"),
        ({"multi_turn_fraction": 1.5}, "multi_turn_fraction"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, name: str) -> None:
    args = {"rows": 10, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        syn.generate(**args)


def test_twenty_thousand_rows_in_a_few_seconds() -> None:
    start = time.perf_counter()
    assert len(syn.generate(20000, seed=1)) == 20000
    assert time.perf_counter() - start < 10.0


# --- label distributions ---------------------------------------------------------------------


def test_every_attribute_spans_the_range(rows: list[dict]) -> None:
    for name in HELPSTEER_ATTRIBUTES:
        values = [row[name] for row in rows]
        assert all(type(v) is int and 0 <= v <= 4 for v in values), name
        counts = Counter(values)
        for value in range(5):
            assert counts[value] / len(rows) >= 0.05, (name, value, counts)


def test_helpfulness_follows_correctness_like_helpsteer() -> None:
    data = syn.generate(5000, seed=21)
    h = np.array([r["helpfulness"] for r in data], dtype=float)
    c = np.array([r["correctness"] for r in data], dtype=float)
    assert 0.80 <= np.corrcoef(h, c)[0, 1] <= 0.90


def test_no_other_pair_of_attributes_is_collinear(rows: list[dict]) -> None:
    table = np.array([[row[n] for n in HELPSTEER_ATTRIBUTES] for row in rows], dtype=float)
    corr = np.corrcoef(table.T)
    names = list(HELPSTEER_ATTRIBUTES)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if {names[i], names[j]} == {"helpfulness", "correctness"}:
                continue
            assert abs(corr[i, j]) < 0.5, (names[i], names[j], corr[i, j])


def test_helpfulness_rule() -> None:
    assert syn.helpfulness_label(4, 4, 2) == 4  # 3.2 + 1.0 + 0.8 - 0.85 = 4.15
    assert syn.helpfulness_label(0, 0, 0) == 0  # -0.85 clips to 0
    assert syn.helpfulness_label(2, 4, 2) == 3  # 1.6 + 1.0 + 0.8 - 0.85 = 2.55
    assert syn.helpfulness_label(2, 4, 2, noise=-0.1) == 2  # 2.45
    assert syn.helpfulness_label(4, 4, 2, noise=5.0) == 4  # the computed value is clipped


# --- verbosity -------------------------------------------------------------------------------


def test_verbosity_is_the_length_relative_to_the_request(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    ratios, labels = [], []
    for row, plan in planned:
        sentences = syn.split_sentences(row["response"])
        assert sentences == list(plan.sentences)
        target = syn.target_sentences(row["prompt"])
        assert target == plan.target_sentences
        assert syn.verbosity_from_text(row["prompt"], row["response"]) == row["verbosity"]
        ratios.append(len(sentences) / target)
        labels.append(row["verbosity"])
    assert spearmanr(ratios, labels).statistic > 0.8


def test_the_same_length_gets_different_labels_for_different_requests(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    response = "The capital of France is Paris. Also, France is in Europe."
    assert syn.verbosity_from_text("In one sentence, tell me about France.", response) == 4
    assert syn.verbosity_from_text("Tell me about France. Explain in detail.", response) == 0
    assert syn.verbosity_from_text("Briefly, tell me about France.", response) == 2
    # In the data too: two-sentence responses get low labels after long requests, high after
    # one-sentence requests.
    by_target: dict[int, set[int]] = {}
    for row, plan in planned:
        if len(plan.sentences) == 2:
            by_target.setdefault(plan.target_sentences, set()).add(row["verbosity"])
    assert by_target[1] == {4} and by_target[5] == {0}


def test_length_requests_are_read_from_the_wording() -> None:
    for target, (prefixes, suffixes) in syn.LENGTH_REQUESTS.items():
        for prefix in prefixes:
            assert syn.target_sentences(f"{prefix}, describe the planet Mars.") == target
        for suffix in suffixes:
            assert syn.target_sentences(f"Describe the planet Mars. {suffix}") == target
    assert syn.target_sentences("Describe the planet Mars.") is None


def test_responses_stay_short(rows: list[dict]) -> None:
    assert max(len(row["response"].split()) for row in rows) <= 260


# --- complexity ------------------------------------------------------------------------------


def test_word_and_sentence_length_rise_with_complexity(rows: list[dict]) -> None:
    word_len: dict[int, list[float]] = {}
    sent_len: dict[int, list[float]] = {}
    for row in rows:
        words = re.findall(r"[A-Za-z]+", row["response"])
        sentences = syn.split_sentences(row["response"])
        word_len.setdefault(row["complexity"], []).append(float(np.mean([len(w) for w in words])))
        sent_len.setdefault(row["complexity"], []).append(len(words) / len(sentences))
    mean_word = [np.mean(word_len[level]) for level in range(5)]
    mean_sent = [np.mean(sent_len[level]) for level in range(5)]
    assert np.all(np.diff(mean_word) > 0), mean_word
    assert np.all(np.diff(mean_sent) > 0), mean_sent


# --- coherence -------------------------------------------------------------------------------


def test_coherence_is_four_minus_the_disruptions(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    seen: Counter[str] = Counter()
    for row, plan in planned:
        assert row["coherence"] == syn.coherence_label(plan.disruptions) == 4 - len(plan.disruptions)
        seen.update(plan.disruptions)
    assert set(seen) == set(syn.DISRUPTIONS)


def test_coherent_responses_follow_the_plan(planned: list[tuple[dict, syn.ResponsePlan]]) -> None:
    for row, plan in planned:
        if row["coherence"] != 4:
            continue
        sentences = syn.split_sentences(row["response"])
        assert sentences == list(plan.planned)
        assert syn.parse_fact(sentences[0]) is not None  # opens with a fact
        assert all(_starts_with_connective(s) for s in sentences[1:])
        parsed = [syn.parse_fact(s) for s in sentences]
        assert not any(f is not None and f.negated for f in parsed)


def test_each_disruption_is_visible_in_the_text(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    off_topic_bank = {s for level in syn.OFF_TOPIC for s in level}
    entity_names = [name for base in syn.FACT_BASE.values() for name in base]
    for row, plan in planned:
        sentences = syn.split_sentences(row["response"])
        facts = [syn.parse_fact(s) for s in sentences]
        off = [i for i, s in enumerate(sentences) if s in off_topic_bank]
        negated = [i for i, f in enumerate(facts) if f is not None and f.negated]
        content = [s for i, s in enumerate(sentences) if i not in off and i not in negated]

        if "off_topic" in plan.disruptions:
            assert len(off) == 1 and off[0] > 0
            assert not any(re.search(rf"\b{re.escape(n)}\b", sentences[off[0]], re.I) for n in entity_names)
        else:
            assert off == []

        if "contradiction" in plan.disruptions:
            assert len(negated) == 1
            neg = facts[negated[0]]
            assert neg is not None
            earlier = [f for f in facts[: negated[0]] if f is not None and not f.negated]
            assert any(
                (f.kind, f.prop, f.subject, f.value.casefold())
                == (neg.kind, neg.prop, neg.subject, neg.value.casefold())
                for f in earlier
            ), row["response"]
        else:
            assert negated == []

        if "no_connectives" in plan.disruptions:
            assert not any(_starts_with_connective(s) for s in sentences)
            expected = [_strip_connective(s) for s in plan.planned]
        else:
            expected = list(plan.planned)
        if "shuffle" in plan.disruptions:
            assert sorted(content) == sorted(expected) and content[0] != expected[0]
        else:
            assert content == expected


def test_off_topic_sentences_name_nothing_from_the_fact_base() -> None:
    names = [name for base in syn.FACT_BASE.values() for name in base]
    for sentence in (s for level in syn.OFF_TOPIC for s in level):
        assert syn.parse_fact(sentence) is None
        assert not any(re.search(rf"\b{re.escape(n)}\b", sentence, re.I) for n in names), sentence


def test_shuffled_responses_keep_connectives_out_of_place(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    # With connectives kept, a shuffle puts a connective on the first sentence.
    shuffled = [
        plan
        for _, plan in planned
        if "shuffle" in plan.disruptions and "no_connectives" not in plan.disruptions
    ]
    assert shuffled
    assert all(_starts_with_connective(plan.sentences[0]) for plan in shuffled)


# --- correctness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("The capital of France is Paris.", True),
        ("The capital of France is Tokyo.", False),
        ("Furthermore, the designated national capital of France is Paris, as books say.", True),
        ("Iron is a solid at room temperature.", True),
        ("Also, iron is a gas at room temperature, as you can check.", False),
        ("The atomic number of gold is 79.", True),
        ("The atomic number of gold is 80.", False),
        ("Mars is the fourth planet from the Sun.", True),
        ("Mars is the fifth planet from the Sun.", False),
        ("The largest moon of Earth is the Moon.", True),
        ("17 times 3 is 51.", True),
        ("17 times 3 is 52.", False),
        ("The arithmetical sum of 48 and 27 is 75.", True),
        ("The capital of France is not Paris.", None),  # a negation is not a stated fact
        ("Many people like to learn about France.", None),
        ("My cat likes to sleep all day.", None),
    ],
)
def test_fact_is_correct(sentence: str, expected: bool | None) -> None:
    assert syn.fact_is_correct(sentence) is expected


def test_correctness_label_rule() -> None:
    assert syn.correctness_label(1, 8) == 1  # 0.5 rounds half up, not to even
    assert syn.correctness_label(1, 3) == 1
    assert syn.correctness_label(2, 3) == 3
    assert syn.correctness_label(3, 3) == 4
    assert syn.correctness_label(0, 1) == 0


def test_correctness_label_agrees_with_the_fact_base(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    for row, plan in planned:
        assert syn.correctness_from_text(row["response"]) == row["correctness"], row["response"]
        for sentence, right in plan.facts:
            assert syn.fact_is_correct(sentence) is right


def test_a_wrong_fact_differs_from_the_right_one_only_in_the_value(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    wrong = [s for _, plan in planned for s, right in plan.facts if not right]
    assert len(wrong) > 100
    for sentence in wrong:
        fact = syn.parse_fact(sentence)
        assert fact is not None and not fact.holds
        if fact.kind == "arithmetic":
            a, symbol, b = fact.subject.split()
            true = str(int(a) + int(b) if symbol == "plus" else int(a) * int(b))
        else:
            true = syn.FACT_BASE[fact.kind][fact.subject][fact.prop]
        head, _, tail = sentence.rpartition(fact.value)
        assert syn.fact_is_correct(head + true + tail) is True, sentence


# --- text hygiene ----------------------------------------------------------------------------


def test_no_marker_tokens_or_tags(rows: list[dict]) -> None:
    tag = re.compile(r"\[\s*\d+\s*\]|[\[\]<>{}]|\b(?:" + "|".join(HELPSTEER_ATTRIBUTES) + r")\s*[:=]", re.I)
    for row in rows:
        assert not tag.search(row["response"]), row["response"]
        prompt = (
            row["prompt"].replace("\n<extra_id_1>Assistant\n", "\n").replace("\n<extra_id_1>User\n", "\n")
        )
        assert not tag.search(prompt), row["prompt"]
        for name in HELPSTEER_ATTRIBUTES:
            assert name not in row["response"].casefold()


# --- multi-turn prompts ----------------------------------------------------------------------


def test_multi_turn_prompts_follow_helpsteer2(
    planned: list[tuple[dict, syn.ResponsePlan]],
) -> None:
    prompts = list(dict.fromkeys(row["prompt"] for row, _ in planned))
    multi = [p for p in prompts if "<extra_id_1>" in p]
    assert 0.06 <= len(multi) / len(prompts) <= 0.14
    shape = re.compile(r"^[^\n<]+\n<extra_id_1>Assistant\n[^\n<]+\n<extra_id_1>User\n[^\n<]+$")
    for prompt in multi:
        assert shape.match(prompt), prompt
        turns = parse_prompt_turns(prompt)
        assert [t.role for t in turns] == ["User", "Assistant", "User"]
        # The length request is in the last user turn only.
        assert syn.target_sentences(turns[0].text) is None
        assert syn.target_sentences(prompt) is not None
    for row, plan in planned:
        assert syn.target_sentences(row["prompt"]) == plan.target_sentences


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 1)])
def test_multi_turn_fraction_extremes(fraction: float, expected: int) -> None:
    data = syn.generate(100, seed=8, multi_turn_fraction=fraction)
    assert {int("<extra_id_1>" in r["prompt"]) for r in data} == {expected}


# --- writing ---------------------------------------------------------------------------------


def _read_shards(folder: Path) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        json.loads(line)
        for name in manifest["files"]
        for line in (folder / name).read_text(encoding="utf-8").splitlines()
    ]


def test_write_synthetic_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "data" / "synthetic"
    paths = syn.write_synthetic(out, rows=2500, seed=3, shard_rows=1000, multi_turn_fraction=0.2)
    assert [p.name for p in paths] == [f"synthetic-0000{i}.jsonl" for i in range(3)]
    assert [len(p.read_text().splitlines()) for p in paths] == [1000, 1000, 500]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {
        "generator_version": syn.GENERATOR_VERSION,
        "rows": 2500,
        "seed": 3,
        "responses_per_prompt": [2, 4],
        "multi_turn_fraction": 0.2,
        "files": [p.name for p in paths],
        "attribute_schema": HELPSTEER.to_dict(),
    }
    assert _read_shards(out) == syn.generate(2500, seed=3, multi_turn_fraction=0.2)
    load_and_check_schema(out, HELPSTEER)


def test_write_synthetic_refuses_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "someone_else"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        syn.write_synthetic(foreign, rows=10, seed=1)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (foreign / "manifest.json").write_text('{"stage": "filter"}')
    with pytest.raises(ValueError, match="not this generator.s manifest"):
        syn.write_synthetic(foreign, rows=10, seed=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.json", "notes.txt"]


def test_write_synthetic_accepts_an_empty_folder_and_replaces_its_own_output(
    tmp_path: Path,
) -> None:
    out = tmp_path / "synthetic"
    out.mkdir()
    syn.write_synthetic(out, rows=250, seed=1, shard_rows=100)
    assert len(list(out.glob("synthetic-*.jsonl"))) == 3
    paths = syn.write_synthetic(out, rows=120, seed=2, shard_rows=100)
    assert sorted(out.glob("synthetic-*.jsonl")) == paths and len(paths) == 2
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    assert _read_shards(out) == syn.generate(120, seed=2)


def test_write_synthetic_rejects_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="responses_per_promt"):
        syn.write_synthetic(tmp_path / "x", rows=10, seed=1, responses_per_promt=(1, 2))
    assert not (tmp_path / "x").exists()
