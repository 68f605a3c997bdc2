"""The attribute schema and the one attribute-string format: golden strings, errors that name the
attribute, value and range, the parse/format round trip, and the schema stored beside outputs."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpsteer_core.attributes import (
    HELPSTEER,
    HELPSTEER_ATTRIBUTES,
    NEMO_ATTRIBUTES,
    SCHEMA_FILE,
    STEERLM,
    AttributeSchema,
    AttributeValueError,
    format_attributes,
    level_words_problem,
    load_and_check_schema,
    load_schema,
    parse_attributes,
)

DESIGN_STRING = "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2"
DESIGN_VALUES = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}


# --- the schemas -------------------------------------------------------------------------------


def test_steerlm_is_nemo_order() -> None:
    assert STEERLM.names == (
        "quality",
        "toxicity",
        "humor",
        "creativity",
        "helpfulness",
        "correctness",
        "coherence",
        "complexity",
        "verbosity",
    )
    assert NEMO_ATTRIBUTES == STEERLM.names
    assert (STEERLM.low, STEERLM.high) == (0, 4)
    assert STEERLM.id == "steerlm-v1"


def test_helpsteer_is_last_five_of_steerlm() -> None:
    assert HELPSTEER.names == STEERLM.names[-5:]
    assert HELPSTEER.names == HELPSTEER_ATTRIBUTES
    assert HELPSTEER.names == ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    assert (HELPSTEER.low, HELPSTEER.high, HELPSTEER.version) == (0, 4, 1)
    assert HELPSTEER.id == "helpsteer-v1"


def test_subset_keeps_schema_order_and_rejects_unknown_names() -> None:
    sub = STEERLM.subset(["verbosity", "quality"], name="two")
    assert sub.names == ("quality", "verbosity")
    with pytest.raises(AttributeValueError, match="unknown attribute 'funniness'"):
        STEERLM.subset(["funniness"], name="bad")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ("a", "a")}, "duplicate names"),
        ({"names": ()}, "no attribute names"),
        ({"names": ("a",), "low": 4, "high": 4}, "low 4 >= high 4"),
    ],
)
def test_schema_rejects_bad_definitions(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttributeSchema("bad", 1, **kwargs)


# --- format_attributes ------------------------------------------------------------------------


def test_format_design_example() -> None:
    assert format_attributes(DESIGN_VALUES) == DESIGN_STRING


def test_format_uses_schema_order_not_dict_order() -> None:
    shuffled = dict(reversed(list(DESIGN_VALUES.items())))
    assert list(shuffled)[0] == "verbosity"
    assert format_attributes(shuffled) == DESIGN_STRING
    assert format_attributes({"verbosity": 2, "quality": 3}) == "quality:3,verbosity:2"


def test_format_leaves_out_none_and_missing() -> None:
    values = {"helpfulness": 4, "correctness": None, "coherence": 3, "verbosity": None}
    assert format_attributes(values) == "helpfulness:4,coherence:3"
    assert format_attributes({}) == ""
    assert format_attributes({"quality": None}) == ""


COMPLEXITY_WORDS = ["very simple", "simple", "moderate", "advanced", "expert"]


def test_format_says_the_levels_of_the_worded_attributes_in_words() -> None:
    words = {"complexity": COMPLEXITY_WORDS}
    values = {"helpfulness": 4, "complexity": 0, "verbosity": 3}
    assert format_attributes(values, words=words) == "helpfulness:4,complexity:very simple,verbosity:3"
    assert format_attributes({"complexity": 4}, words=words) == "complexity:expert"
    with pytest.raises(AttributeValueError, match="'complexity' = 5 is outside the range"):
        format_attributes({"complexity": 5}, words=words)


@pytest.mark.parametrize(
    ("name", "words", "message"),
    [
        ("wit", COMPLEXITY_WORDS, "wit: unknown attribute; allowed: quality"),
        ("complexity", COMPLEXITY_WORDS[:4], r"4 words; one per level 0..4 \(5\) is needed"),
        ("complexity", ["a", "b", "c", "d", "a,b"], "'a,b' is not a word for a level"),
        ("complexity", ["a", "b", "c", "d", " e"], "' e' is not a word for a level"),
        ("complexity", ["a", "b", "c", "d", "d"], "name two levels alike"),
    ],
)
def test_level_words_problem_names_the_attribute_and_what_is_allowed(
    name: str, words: list[str], message: str
) -> None:
    problem = level_words_problem(name, words)
    assert problem is not None
    assert problem.startswith(f"{name}: ")
    assert re.search(message, problem)
    assert level_words_problem("complexity", COMPLEXITY_WORDS) is None


def test_format_writes_integral_floats_as_integers() -> None:
    assert format_attributes({"helpfulness": 3.0}) == "helpfulness:3"


def test_format_never_clamps() -> None:
    with pytest.raises(
        AttributeValueError, match=r"'helpfulness' = 5 is outside the range; allowed: an integer in 0..4"
    ):
        format_attributes({"helpfulness": 5})
    with pytest.raises(AttributeValueError, match=r"'helpfulness' = 2.5 is not an integer"):
        format_attributes({"helpfulness": 2.5})


def test_format_rejects_unknown_name_even_when_none() -> None:
    with pytest.raises(AttributeValueError, match="unknown attribute 'helpfullness'; allowed: quality, "):
        format_attributes({"helpfullness": None})


def test_format_with_helpsteer_schema_rejects_steerlm_only_names() -> None:
    assert format_attributes(DESIGN_VALUES, HELPSTEER) == DESIGN_STRING
    with pytest.raises(AttributeValueError, match="unknown attribute 'quality'; allowed: helpfulness, "):
        format_attributes({"quality": 4}, HELPSTEER)


# --- parse_attributes -------------------------------------------------------------------------


def test_parse_design_example() -> None:
    assert parse_attributes(DESIGN_STRING) == DESIGN_VALUES


def test_parse_empty_string_is_no_attributes() -> None:
    assert parse_attributes("") == {}
    assert parse_attributes("   ") == {}


def test_parse_accepts_any_order_and_spaces() -> None:
    assert parse_attributes("verbosity:2, helpfulness : 4") == {"verbosity": 2, "helpfulness": 4}


def test_parse_unknown_name_lists_allowed() -> None:
    with pytest.raises(AttributeValueError) as err:
        parse_attributes("helpfulness:4,funniness:2")
    assert "unknown attribute 'funniness'" in str(err.value)
    assert "allowed: " + ", ".join(STEERLM.names) in str(err.value)


def test_parse_duplicate_names_the_attribute() -> None:
    with pytest.raises(AttributeValueError, match="'helpfulness' appears twice"):
        parse_attributes("helpfulness:4,correctness:3,helpfulness:2")


@pytest.mark.parametrize("raw", ["2.5", "x", "", "4a"])
def test_parse_non_integer_names_attribute_value_and_range(raw: str) -> None:
    with pytest.raises(AttributeValueError) as err:
        parse_attributes(f"correctness:{raw}")
    message = str(err.value)
    assert f"'correctness' = {raw!r} is not an integer" in message
    assert "allowed: an integer in 0..4" in message


@pytest.mark.parametrize("raw", ["5", "-1", "40"])
def test_parse_out_of_range_names_attribute_value_and_range(raw: str) -> None:
    with pytest.raises(AttributeValueError) as err:
        parse_attributes(f"helpfulness:4,verbosity:{raw}")
    assert f"'verbosity' = {int(raw)} is outside the range; allowed: an integer in 0..4" in str(err.value)


def test_parse_out_of_range_uses_the_schema_range() -> None:
    wide = AttributeSchema("wide", 1, ("helpfulness",), low=0, high=9)
    assert parse_attributes("helpfulness:9", wide) == {"helpfulness": 9}
    with pytest.raises(AttributeValueError, match=r"allowed: an integer in 0..9"):
        parse_attributes("helpfulness:10", wide)


@pytest.mark.parametrize("text", ["helpfulness=4", "helpfulness:4,correctness", "helpfulness:4,"])
def test_parse_malformed_part_shows_expected_form(text: str) -> None:
    with pytest.raises(AttributeValueError) as err:
        parse_attributes(text)
    message = str(err.value)
    assert "is not name:value" in message
    assert "expected e.g. quality:2,toxicity:2" in message


@pytest.mark.parametrize("raw", ["--3", "²"])
def test_parse_odd_digit_strings_raise_attribute_errors(raw: str) -> None:
    with pytest.raises(AttributeValueError, match=r"'helpfulness' = .* is not an integer"):
        parse_attributes(f"helpfulness:{raw}")


@given(st.dictionaries(st.sampled_from(STEERLM.names), st.integers(min_value=0, max_value=4)))
def test_parse_inverts_format(values: dict[str, int]) -> None:
    text = format_attributes(values)
    assert parse_attributes(text) == values
    # And the string is canonical: formatting the parsed values gives the same text back.
    assert format_attributes(parse_attributes(text)) == text


# --- check_value ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, 3.0, 0, 4, 0.0])
def test_check_value_accepts_integers_and_integral_floats(value: object) -> None:
    result = STEERLM.check_value("humor", value)
    assert result == value
    assert type(result) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3.5, "'humor' = 3.5 is not an integer"),
        (True, "'humor' = True is not a number"),
        ("3", "'humor' = '3' is not a number"),
        (None, "'humor' = None is not a number"),
        (5, "'humor' = 5 is outside the range"),
        (-1, "'humor' = -1 is outside the range"),
        (float("nan"), "'humor' = nan is not an integer"),
    ],
)
def test_check_value_rejects_with_name_value_and_range(value: object, message: str) -> None:
    with pytest.raises(AttributeValueError) as err:
        STEERLM.check_value("humor", value)
    assert message in str(err.value)
    assert "allowed: an integer in 0..4" in str(err.value)


def test_check_value_rejects_unknown_name() -> None:
    with pytest.raises(AttributeValueError, match="unknown attribute 'wit'"):
        STEERLM.check_value("wit", 3)


# --- the stored schema ------------------------------------------------------------------------


def test_schema_save_and_load_round_trip(tmp_path) -> None:
    path = HELPSTEER.save(tmp_path / "model")
    assert path == tmp_path / "model" / SCHEMA_FILE
    assert json.loads(path.read_text()) == {
        "name": "helpsteer",
        "version": 1,
        "attributes": ["helpfulness", "correctness", "coherence", "complexity", "verbosity"],
        "range": [0, 4],
    }
    assert load_schema(tmp_path / "model") == HELPSTEER
    assert load_and_check_schema(tmp_path / "model", HELPSTEER) == HELPSTEER


def test_load_schema_missing_file_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / SCHEMA_FILE)):
        load_schema(tmp_path)


def test_load_schema_not_a_schema_names_file_and_expected_keys(tmp_path) -> None:
    (tmp_path / SCHEMA_FILE).write_text(json.dumps({"name": "x", "attributes": ["a"]}))
    with pytest.raises(ValueError) as err:
        load_schema(tmp_path)
    assert str(tmp_path / SCHEMA_FILE) in str(err.value)
    assert "expected keys name, version, attributes, range" in str(err.value)


def test_check_compatible_mismatch_names_both_schemas(tmp_path) -> None:
    STEERLM.save(tmp_path)
    with pytest.raises(ValueError) as err:
        load_and_check_schema(tmp_path, HELPSTEER)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / SCHEMA_FILE}: ")
    assert "steerlm-v1 ['quality', 'toxicity'," in message
    assert "expected helpsteer-v1 ['helpfulness', 'correctness'," in message


def test_check_compatible_sees_a_range_change() -> None:
    other = AttributeSchema("helpsteer", 1, HELPSTEER.names, low=0, high=9)
    with pytest.raises(
        ValueError, match=r"range 0..9 does not match the expected helpsteer-v1 .* range 0..4"
    ):
        HELPSTEER.check_compatible(other, where="x")
    HELPSTEER.check_compatible(AttributeSchema.from_dict(HELPSTEER.to_dict()), where="x")
