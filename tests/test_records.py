"""Row validation: a good row becomes a Record with its extras untouched; every bad kind raises a
RowError naming the field, the value and what is allowed. Nothing is fixed or clamped."""

from __future__ import annotations

import json

import pytest

from helpsteer_core.attributes import HELPSTEER, STEERLM
from helpsteer_core.records import Record, RowError, parse_json_line, validate_row

GOOD = {
    "prompt": "What is 2 + 2?",
    "response": "It is 4.",
    "helpfulness": 4,
    "correctness": 4,
    "coherence": 4,
    "complexity": 0,
    "verbosity": 1,
}


_DROP = object()  # with_(field=_DROP) removes the field


def with_(**changes: object) -> dict:
    row = dict(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


def test_good_row_becomes_a_record() -> None:
    record = validate_row(GOOD)
    assert isinstance(record, Record)
    assert (record.prompt, record.response) == ("What is 2 + 2?", "It is 4.")
    # Every schema attribute is present, None where the row has no label.
    assert dict(record.attributes) == {
        "quality": None,
        "toxicity": None,
        "humor": None,
        "creativity": None,
        "helpfulness": 4,
        "correctness": 4,
        "coherence": 4,
        "complexity": 0,
        "verbosity": 1,
    }
    assert record.labelled() == {
        "helpfulness": 4,
        "correctness": 4,
        "coherence": 4,
        "complexity": 0,
        "verbosity": 1,
    }
    assert record.extra == {}


def test_extras_are_carried_untouched_and_provenance_is_not_an_extra() -> None:
    nested = {"tags": ["a", "b"], "score": 0.5}
    row = with_(id="row-17", source="hs2", meta=nested, input_file="x.jsonl", input_line=3)
    record = validate_row(row)
    assert record.extra == {"id": "row-17", "source": "hs2", "meta": nested}
    assert record.extra["meta"] is nested


def test_integral_float_attributes_become_ints() -> None:
    record = validate_row(with_(helpfulness=3.0))
    assert record.attributes["helpfulness"] == 3
    assert type(record.attributes["helpfulness"]) is int


@pytest.mark.parametrize("missing", [None, float("nan"), _DROP])
def test_none_nan_and_absent_attributes_are_missing(missing: object) -> None:
    record = validate_row(with_(correctness=missing))
    assert record.attributes["correctness"] is None
    assert "correctness" not in record.labelled()


def test_validate_row_does_not_mutate_the_input() -> None:
    row = with_(helpfulness=3.0, id="x")
    before = json.dumps(row, sort_keys=True)
    validate_row(row)
    assert json.dumps(row, sort_keys=True) == before


def test_other_schema_sees_its_own_attributes_only() -> None:
    record = validate_row(with_(quality=9), HELPSTEER)  # quality is not a HelpSteer attribute
    assert set(record.attributes) == set(HELPSTEER.names)
    assert record.extra == {"quality": 9}
    with pytest.raises(RowError) as err:
        validate_row(with_(quality=9), STEERLM)
    assert err.value.field == "quality"


@pytest.mark.parametrize(
    ("row", "field", "fragments"),
    [
        (with_(prompt=_DROP), "prompt", ["missing", "non-empty string 'prompt' and 'response'"]),
        (with_(prompt=None), "prompt", ["missing"]),
        (with_(response=_DROP), "response", ["missing"]),
        (with_(response=42), "response", ["42 has type int", "allowed: a non-empty string"]),
        (with_(response=["It", "is"]), "response", ["['It', 'is'] has type list", "a non-empty string"]),
        (with_(prompt=""), "prompt", ["is empty", "allowed: a non-empty string"]),
        (with_(response=" \n\t "), "response", ["is empty", "allowed: a non-empty string"]),
        (with_(helpfulness=7), "helpfulness", ["'helpfulness' = 7 is outside the range", "in 0..4"]),
        (with_(verbosity=-1), "verbosity", ["'verbosity' = -1 is outside the range", "an integer in 0..4"]),
        (with_(coherence=2.5), "coherence", ["'coherence' = 2.5 is not an integer", "an integer in 0..4"]),
        (with_(complexity="3"), "complexity", ["'complexity' = '3' is not a number", "an integer in 0..4"]),
        (with_(correctness=True), "correctness", ["'correctness' = True is not a number", "in 0..4"]),
        (with_(quality=[1]), "quality", ["'quality' = [1] is not a number", "an integer in 0..4"]),
        (
            with_(prompt="q\n<extra_id_1>Robot\nx"),
            "prompt",
            ["multi-turn format", "expected a role line 'User' or 'Assistant'"],
        ),
    ],
)
def test_bad_rows_name_field_value_and_allowed(row: dict, field: str, fragments: list[str]) -> None:
    with pytest.raises(RowError) as err:
        validate_row(row)
    assert err.value.field == field
    assert str(err.value) == f"{field}: {err.value.message}"
    for fragment in fragments:
        assert fragment in err.value.message


def test_long_bad_value_is_previewed_not_dumped() -> None:
    with pytest.raises(RowError) as err:
        validate_row(with_(response=[1] * 1000))
    assert len(err.value.message) < 120
    assert "... has type list" in err.value.message


def test_a_non_mapping_row_is_rejected() -> None:
    with pytest.raises(RowError) as err:
        validate_row([1, 2])  # type: ignore[arg-type]
    assert (err.value.field, err.value.message) == ("row", "expected a JSON object, found list")


def test_parse_json_line_reads_an_object() -> None:
    assert parse_json_line(json.dumps(GOOD)) == GOOD


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "p", ',
            "not valid JSON (Expecting property name enclosed in double quotes at column 17)",
        ),
        ("not json", "not valid JSON (Expecting value at column 1)"),
        ("[1, 2, 3]", "expected a JSON object, found list"),
        ('"text"', "expected a JSON object, found str"),
        ("null", "expected a JSON object, found NoneType"),
    ],
)
def test_parse_json_line_errors(line: str, message: str) -> None:
    with pytest.raises(RowError) as err:
        parse_json_line(line)
    assert err.value.field == "line"
    assert err.value.message == message


def test_json_nan_attribute_is_missing() -> None:
    record = validate_row(parse_json_line('{"prompt": "p", "response": "r", "humor": NaN}'))
    assert record.attributes["humor"] is None


def test_helpsteer2_sample_rows_all_validate(helpsteer2_sample) -> None:
    records = [validate_row(parse_json_line(line), HELPSTEER) for line in helpsteer2_sample.open()]
    assert len(records) == 60
    for record in records:
        assert set(record.labelled()) == set(HELPSTEER.names)
        assert record.extra == {}
