"""The attribute schema and the one attribute-string format.

The schema is a single versioned object (names, order, range). It is written beside every model
and dataset we produce (`attribute_schema.json`) and checked when they are read back, so a model
trained on one set of attributes is never silently used with another.

The attribute string is what SteerLM puts after `<extra_id_2>` in the prompt:
`helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2`. `format_attributes` and
`parse_attributes` are the only code that writes or reads it. A generator may be trained with some
levels said in words (`format_attributes(..., words=...)`, `sft.examples.level_words`):
`complexity:very simple` in place of `complexity:0`; such a line is written, never parsed back.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helpsteer_core.readers import SourceError

SCHEMA_FILE = "attribute_schema.json"

# NeMo-Aligner's order: the OpenAssistant four, then the HelpSteer five.
NEMO_ATTRIBUTES: tuple[str, ...] = (
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
HELPSTEER_ATTRIBUTES: tuple[str, ...] = NEMO_ATTRIBUTES[4:]

# What a request that names no value for an attribute asks for. "helpsteer": the SteerLM /
# HelpSteer paper's inference setting, every attribute 4 except toxicity, humor and creativity 0;
# "helpsteer2": HelpSteer2's, the five HelpSteer attributes at 4 except complexity and verbosity 2.
DEFAULT_ATTRIBUTES: dict[str, dict[str, int]] = {
    "helpsteer": {name: 0 if name in ("toxicity", "humor", "creativity") else 4 for name in NEMO_ATTRIBUTES},
    "helpsteer2": {name: 2 if name in ("complexity", "verbosity") else 4 for name in HELPSTEER_ATTRIBUTES},
}


class AttributeValueError(ValueError):
    """An attribute name or value that the schema does not allow."""


@dataclass(frozen=True)
class AttributeSchema:
    """Names (in order) and the inclusive integer range of every attribute."""

    name: str
    version: int
    names: tuple[str, ...]
    low: int = 0
    high: int = 4

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"attribute schema {self.name}: duplicate names in {self.names}")
        if not self.names:
            raise ValueError(f"attribute schema {self.name}: no attribute names")
        if self.low >= self.high:
            raise ValueError(f"attribute schema {self.name}: low {self.low} >= high {self.high}")

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def allowed(self) -> str:
        return f"an integer in {self.low}..{self.high}"

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AttributeValueError(
                f"unknown attribute {name!r}; allowed: {', '.join(self.names)}"
            ) from None

    def subset(self, names: tuple[str, ...] | list[str], name: str) -> AttributeSchema:
        """A schema called `name` with `names` only, kept in this schema's order."""
        for n in names:
            self.index(n)
        ordered = tuple(n for n in self.names if n in set(names))
        return AttributeSchema(name, self.version, ordered, self.low, self.high)

    def check_value(self, name: str, value: object) -> int:
        """Return `value` as an int, or raise naming the attribute, the value and the range.

        Integral floats (3.0, as pandas writes integers next to missing values) are accepted;
        3.5, booleans, strings and values outside the range are not. Nothing is rounded or clamped.
        """
        self.index(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AttributeValueError(
                f"attribute {name!r} = {value!r} is not a number; allowed: {self.allowed()}"
            )
        if isinstance(value, float) and not value.is_integer():
            raise AttributeValueError(
                f"attribute {name!r} = {value!r} is not an integer; allowed: {self.allowed()}"
            )
        as_int = int(value)
        if not self.low <= as_int <= self.high:
            raise AttributeValueError(
                f"attribute {name!r} = {value!r} is outside the range; allowed: {self.allowed()}"
            )
        return as_int

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "attributes": list(self.names),
            "range": [self.low, self.high],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object], where: str = "schema") -> AttributeSchema:
        try:
            bounds = list(data["range"])  # type: ignore[call-overload]
            return cls(
                name=str(data["name"]),
                version=int(data["version"]),  # type: ignore[call-overload]
                names=tuple(data["attributes"]),  # type: ignore[arg-type]
                low=int(bounds[0]),
                high=int(bounds[1]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SourceError(
                f"{where}: not an attribute schema ({exc}); expected keys name, version, attributes, range"
            ) from exc

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SCHEMA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def check_compatible(self, other: AttributeSchema, where: str) -> None:
        """Raise unless `other` (read from `where`) is this schema."""
        if other != self:
            raise SourceError(
                f"{where}: attribute schema {other.id} {list(other.names)} range "
                f"{other.low}..{other.high} does not match the expected {self.id} "
                f"{list(self.names)} range {self.low}..{self.high}"
            )


STEERLM = AttributeSchema("steerlm", 1, NEMO_ATTRIBUTES)
HELPSTEER = STEERLM.subset(HELPSTEER_ATTRIBUTES, name="helpsteer")


def load_schema(directory: str | Path) -> AttributeSchema:
    """Read `attribute_schema.json` from a model or dataset folder."""
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no attribute schema; was this folder written by helpsteer?")
    return AttributeSchema.from_dict(json.loads(path.read_text()), where=str(path))


def load_and_check_schema(directory: str | Path, expected: AttributeSchema) -> AttributeSchema:
    found = load_schema(directory)
    expected.check_compatible(found, where=str(Path(directory) / SCHEMA_FILE))
    return found


# Beside an AC-SFT model trained on apm_quantile levels: the scope, the answer-level attributes,
# the cut points over all training rows (scope all) and the rows per level (train_sft writes it).
LEVELS_FILE = "attribute_levels.json"


def cut_points_problem(name: str, bounds: Sequence[float], schema: AttributeSchema = STEERLM) -> str | None:
    """Why `bounds` are not cut points between `schema`'s levels for `name` (None when they are:
    one fewer than the levels, ascending)."""
    count = schema.high - schema.low
    if len(bounds) != count or list(bounds) != sorted(bounds):
        return f"{name}: {list(bounds)}; expected {count} ascending cut points"
    return None


@dataclass(frozen=True)
class LevelScale:
    """Where the APM's predictions fall on a generator's attribute levels.

    A generator trained on `apm_quantile` levels learnt level k from rows whose APM prediction lies
    between the k-th and (k+1)-th cut point (`attribute_levels.json`), not from predictions near k:
    on the demo's data a verbosity prediction of 2.0 is level 0. Whatever compares the APM's
    scores of a new answer with a requested level (best-of-n, bootstrapping's choice and report)
    places the scores on this scale first. An attribute without cut points is on the APM's own
    0-4 scale (a model trained on human or rounded APM labels has none).
    """

    cuts: Mapping[str, Sequence[float]] = field(default_factory=dict)
    schema: AttributeSchema = STEERLM

    def place(self, name: str, score: float) -> float:
        bounds = self.cuts.get(name)
        if bounds is None:
            return float(score)
        return float(self.schema.low + bisect.bisect_right(bounds, float(score)))

    def placed(self, scores: Mapping[str, float]) -> dict[str, float]:
        return {name: self.place(name, score) for name, score in scores.items()}

    @classmethod
    def read(cls, folder: str | Path, schema: AttributeSchema = STEERLM) -> LevelScale | None:
        """The scale of the AC-SFT model in `folder`: its `attribute_levels.json` cut points, none
        when it was not trained on apm_quantile levels; None when its levels were ranked within
        each prompt (`quantile_scope: prompt`), which leaves no cut points to place an answer by."""
        path = Path(folder) / LEVELS_FILE
        if not path.is_file():
            return cls(schema=schema)
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict) or "cuts" not in recorded:
            raise SourceError(f"{path}: expected a mapping with `cuts` (train_sft's {LEVELS_FILE})")
        if recorded["cuts"] is None:
            return None
        for name, bounds in recorded["cuts"].items():
            schema.index(name)
            problem = cut_points_problem(name, bounds, schema)
            if problem:
                raise SourceError(f"{path}: cuts.{problem}")
        return cls({name: [float(c) for c in bounds] for name, bounds in recorded["cuts"].items()}, schema)


def format_attributes(
    values: Mapping[str, int | None],
    schema: AttributeSchema = STEERLM,
    words: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """`{"verbosity": 2, "helpfulness": 4}` -> `helpfulness:4,verbosity:2` (schema order).

    Attributes that are missing or None are left out; every value is checked, never clamped. An
    attribute in `words` is written as the word for its level (`words[name][value - schema.low]`).
    """
    for name in values:
        schema.index(name)
    parts = []
    for name in schema.names:
        value = values.get(name)
        if value is not None:
            level = schema.check_value(name, value)
            shown = words[name][level - schema.low] if words and name in words else level
            parts.append(f"{name}:{shown}")
    return ",".join(parts)


def level_words_problem(name: str, words: Sequence[str], schema: AttributeSchema = STEERLM) -> str | None:
    """Why `words` cannot name the levels of attribute `name` in an attribute line, or None."""
    if name not in schema.names:
        return f"{name}: unknown attribute; allowed: {', '.join(schema.names)}"
    count = schema.high - schema.low + 1
    if len(words) != count:
        return f"{name}: {len(words)} words; one per level {schema.low}..{schema.high} ({count}) is needed"
    for word in words:
        if not word.strip() or word != word.strip() or re.search(r"[,:\n]", word):
            return f"{name}: {word!r} is not a word for a level (non-empty, no comma, colon or newline)"
    if len(set(words)) < len(words):
        return f"{name}: the words {list(words)} name two levels alike"
    return None


def parse_attributes(text: str, schema: AttributeSchema = STEERLM) -> dict[str, int]:
    """The inverse of `format_attributes`. Rejects unknown names, duplicates and bad values."""
    result: dict[str, int] = {}
    if text.strip() == "":
        return result
    for part in text.split(","):
        name, sep, raw = part.partition(":")
        name = name.strip()
        if not sep:
            raise AttributeValueError(
                f"attribute string {text!r}: {part!r} is not name:value; "
                f"expected e.g. {format_attributes({n: 2 for n in schema.names[:2]}, schema)}"
            )
        if name in result:
            raise AttributeValueError(f"attribute string {text!r}: {name!r} appears twice")
        raw = raw.strip()
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise AttributeValueError(
                f"attribute string {text!r}: {name!r} = {raw!r} is not an integer; "
                f"allowed: {schema.allowed()}"
            )
        result[name] = schema.check_value(name, int(raw))
    return result
