"""Any supported source as conversations: HelpSteer rows, OpenAssistant trees or message tables,
NeMo-Aligner AC-SFT or regression files.

The format is recognised from the first row (or named with `input_format`):
  helpsteer        `prompt` + `response` + attribute columns: JSON Lines or our Parquet folders
                   (filter and relabel output). The prompt stays one User turn, as NeMo-Aligner
                   keeps it; `attribute_source: apm` takes the relabel stage's `apm_<name>_int`.
  oasst-trees      `message_tree_id` + `prompt` (helpsteer_core.oasst)
  oasst-messages   `message_id` + `parent_id`, one message a row (the Hub's oasst1/oasst2 table)
  nemo-acsft       `conversations` (helpsteer_core.nemo_format)
  nemo-regression  `text` + `label`

Every input unit (a row; a tree for OpenAssistant) ends as exactly one `UnitResult`: kept (with
its conversations), filtered (an option left it out, named in `filter`) or rejected (with the
field and the reason), so that `count_results` reconciles. `read_units` reads one shard's raw rows
(`readers.iter_raw_rows`) and runs anywhere: this process for a single-file export, a Ray Data task
for a sharded one. The flat message table is grouped by `message_tree_id` within the rows it is
given, so a tree must not span two calls (a Hub split keeps its trees whole).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from helpsteer_core.attributes import STEERLM, AttributeValueError
from helpsteer_core.config import StrictModel
from helpsteer_core.conversation import DEFAULT_SYSTEM, Conversation, Turn, join_prompt_turns
from helpsteer_core.nemo_format import NemoFormatError, conversation_from_acsft, conversation_from_regression
from helpsteer_core.oasst import (
    OasstOptions,
    TreeError,
    conversations,
    skip_reason,
    tree_from_export,
    tree_from_messages,
)
from helpsteer_core.readers import Shard, SourceError, iter_raw_rows, resolve_source
from helpsteer_core.records import RowError, parse_json_line, validate_row

FORMATS = ("helpsteer", "oasst-trees", "oasst-messages", "nemo-acsft", "nemo-regression")
InputFormat = Literal["auto", "helpsteer", "oasst-trees", "oasst-messages", "nemo-acsft", "nemo-regression"]
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"
RAW_PREVIEW = 2000  # characters of a rejected unit's text kept in the rejects file


class ReadOptions(StrictModel):
    """How a source is read as conversations; the defaults are NeMo-Aligner's choices."""

    input_format: InputFormat = "auto"
    oasst: OasstOptions = OasstOptions()
    # HelpSteer rows: the human labels (`helpfulness`, ...) or the APM's rounded ones (`apm_<name>_int`).
    attribute_source: Literal["human", "apm"] = "human"
    # The system text of HelpSteer and OpenAssistant conversations (NeMo files carry their own).
    system: str = DEFAULT_SYSTEM
    hf_split: str = "train"  # which split of a Hugging Face dataset to read


SOURCE_COLUMN = "data_source"  # the column that names a row's source when a run reads several


class DataSource(StrictModel):
    """One of a run's several sources (a pipeline's or the filter stage's `data:` list): where it
    is, how to read it, and what the run does with its rows, which carry its `name` in
    `data_source`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str  # a file, a folder, hf:ID or owner/name (helpsteer_core.readers)
    input_format: InputFormat = "auto"
    hf_split: str = "train"
    oasst: OasstOptions = OasstOptions()  # OpenAssistant sources: which trees and messages
    apm: bool = True  # its labelled rows train the APM (and its validation rows score it)
    # AC-SFT on its rows: conditioned on its own labels (human), on the APM's after relabel (apm,
    # or apm_quantile: ranked into five levels), or not trained on (none).
    sft: Literal["human", "apm", "apm_quantile", "none"] = "none"
    repeat: int = Field(1, ge=1)  # times each of its rows is an AC-SFT example an epoch (NeMo: 4)


def rows_of_sources(rows: list[dict[str, Any]], names: list[str] | None, where: str) -> list[dict[str, Any]]:
    """The rows whose `data_source` is one of `names` (all rows when `names` is None). A named
    source with no rows here is a ValueError naming the sources `where` holds."""
    if names is None:
        return rows
    found = sorted({str(r.get(SOURCE_COLUMN)) for r in rows if r.get(SOURCE_COLUMN) is not None})
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(
            f"{where}: no rows of source(s) {missing}; the sources there: {found or 'none named'}"
        )
    wanted = set(names)
    return [r for r in rows if r.get(SOURCE_COLUMN) in wanted]


def check_source_names(sources: list[DataSource]) -> list[DataSource]:
    """`sources` if their names are distinct and there is at least one, else a ValueError."""
    names = [s.name for s in sources]
    if not names:
        raise ValueError("data: an empty list; name at least one source")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"data: source names {repeated} given more than once; each source needs its own")
    return sources


@dataclass(frozen=True)
class UnitResult:
    """What became of one input unit (a row, or one OpenAssistant tree)."""

    input_file: str
    input_line: int
    status: str  # kept, filtered or rejected
    conversations: tuple[Conversation, ...] = ()
    field: str = ""  # rejected: the field at fault; filtered: the option that left it out
    reason: str = ""
    raw: str = ""  # rejected: the unit's text (shortened), to look at
    rows: int = 1  # input rows in this unit (a tree of the message table has several)

    def reject_record(self) -> dict[str, Any]:
        return {
            "input_file": self.input_file,
            "input_line": self.input_line,
            "field": self.field,
            "reason": self.reason,
            "raw": self.raw[:RAW_PREVIEW],
        }


def detect_format(row: Mapping[str, Any], where: str) -> str:
    """The format of a source whose first row is `row`; `SourceError` when none fits."""
    keys = set(row)
    if "conversations" in keys:
        return "nemo-acsft"
    if {"text", "label"} <= keys:
        return "nemo-regression"
    if "message_tree_id" in keys and isinstance(row.get("prompt"), Mapping):
        return "oasst-trees"
    if {"message_id", "parent_id"} <= keys:
        return "oasst-messages"
    if {"prompt", "response"} <= keys:
        return "helpsteer"
    raise SourceError(
        f"{where}: cannot tell the format from the keys {sorted(keys)[:12]}; expected one of: "
        "prompt+response (helpsteer), message_tree_id+prompt (oasst-trees), "
        "message_id+parent_id (oasst-messages), conversations (nemo-acsft), text+label (nemo-regression); "
        "or name it with input_format"
    )


def source_format(shards: list[Shard], requested: str) -> str:
    """`requested`, or the format of the first row that parses (`SourceError` if there is none)."""
    if requested != "auto":
        return requested
    for shard in shards:
        for raw in iter_raw_rows(shard):
            if raw["read_error"]:
                continue
            try:
                row = parse_json_line(raw["raw"])
            except RowError:
                continue
            return detect_format(row, f"{raw['input_file']}:{raw['input_line']}")
    raise SourceError(f"{shards[0].label}: no row parses as a JSON object; nothing to read")


def _rejected(raw: Mapping[str, Any], field_name: str, reason: str, rows: int = 1) -> UnitResult:
    return UnitResult(
        raw["input_file"],
        raw["input_line"],
        REJECTED,
        field=field_name,
        reason=reason,
        raw=raw["raw"],
        rows=rows,
    )


def _helpsteer_conversation(row: Mapping[str, Any], options: ReadOptions) -> Conversation:
    record = validate_row(row, STEERLM)
    if options.attribute_source == "human":
        attributes = record.labelled()
    else:
        attributes = {}
        for name in STEERLM.names:
            value = row.get(f"apm_{name}_int")
            if value is not None:
                try:
                    attributes[name] = STEERLM.check_value(name, value)
                except AttributeValueError as exc:
                    raise RowError(f"apm_{name}_int", str(exc)) from None
        if not attributes:
            raise RowError("apm_<name>_int", "missing; attribute_source apm reads the relabel stage's output")
    turns = (Turn("User", record.prompt), Turn("Assistant", record.response, attributes))
    return Conversation(turns, system=options.system, meta={"source": "helpsteer"})


def _line_unit(raw: Mapping[str, Any], fmt: str, options: ReadOptions) -> UnitResult:
    """One row of a one-unit-a-line format, kept, filtered or rejected."""
    if raw["read_error"]:
        return _rejected(raw, "file", raw["read_error"])
    try:
        row = parse_json_line(raw["raw"])
        if fmt == "helpsteer":
            found: list[Conversation] = [_helpsteer_conversation(row, options)]
        elif fmt == "nemo-acsft":
            found = [conversation_from_acsft(row)]
        elif fmt == "nemo-regression":
            found = [conversation_from_regression(row)]
        else:
            tree = tree_from_export(row)
            skipped = skip_reason(tree, options.oasst)
            if skipped:
                return UnitResult(
                    raw["input_file"], raw["input_line"], FILTERED, field=skipped[0], reason=skipped[1]
                )
            found = conversations(tree, options.oasst, options.system)
    except (RowError, NemoFormatError, TreeError) as exc:
        return _rejected(raw, exc.field, exc.message)
    if not found:
        return UnitResult(
            raw["input_file"],
            raw["input_line"],
            FILTERED,
            field="no_conversation",
            reason="no path of 2+ turns",
        )
    return UnitResult(raw["input_file"], raw["input_line"], KEPT, tuple(found))


def _message_table_units(raws: Iterable[Mapping[str, Any]], options: ReadOptions) -> Iterator[UnitResult]:
    """The flat message table: rows grouped into trees by `message_tree_id`, trees in the order
    of their first row; a tree is one unit (its `rows` counts its messages)."""
    trees: dict[str, list[tuple[Mapping[str, Any], dict[str, Any]]]] = {}
    for raw in raws:
        if raw["read_error"]:
            yield _rejected(raw, "file", raw["read_error"])
            continue
        try:
            row = dict(parse_json_line(raw["raw"]))
        except RowError as exc:
            yield _rejected(raw, exc.field, exc.message)
            continue
        tree_id = row.get("message_tree_id")
        if tree_id is None:
            yield _rejected(raw, "message_tree_id", "missing; every message names its tree")
            continue
        trees.setdefault(str(tree_id), []).append((raw, row))
    for members in trees.values():
        first = members[0][0]
        try:
            tree = tree_from_messages([row for _, row in members])
        except TreeError as exc:
            lines = ",".join(str(raw["input_line"]) for raw, _ in members)
            yield UnitResult(
                first["input_file"],
                first["input_line"],
                REJECTED,
                field=exc.field,
                reason=f"{exc.message} (the tree's rows: lines {lines})",
                raw=json.dumps([row for _, row in members], ensure_ascii=False, default=str),
                rows=len(members),
            )
            continue
        skipped = skip_reason(tree, options.oasst)
        found = [] if skipped else conversations(tree, options.oasst, options.system)
        if skipped:
            yield UnitResult(
                first["input_file"],
                first["input_line"],
                FILTERED,
                field=skipped[0],
                reason=skipped[1],
                rows=len(members),
            )
        elif not found:
            yield UnitResult(
                first["input_file"],
                first["input_line"],
                FILTERED,
                field="no_conversation",
                reason="no path of 2+ turns",
                rows=len(members),
            )
        else:
            yield UnitResult(first["input_file"], first["input_line"], KEPT, tuple(found), rows=len(members))


def read_units(raws: Iterable[Mapping[str, Any]], fmt: str, options: ReadOptions) -> Iterator[UnitResult]:
    """The units of raw rows (`readers.iter_raw_rows`) in format `fmt`, in input order."""
    if fmt not in FORMATS:
        raise SourceError(f"input format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "oasst-messages":
        yield from _message_table_units(raws, options)
        return
    for raw in raws:
        yield _line_unit(raw, fmt, options)


def read_shards(shards: list[Shard], fmt: str, options: ReadOptions) -> Iterator[UnitResult]:
    """Every shard's units, shard after shard; the message table is grouped over all shards."""
    raws = (raw for shard in shards for raw in iter_raw_rows(shard))
    yield from read_units(raws, fmt, options)


def turn_rows(unit: UnitResult) -> list[dict[str, Any]]:
    """A kept unit's assistant turns as HelpSteer-style rows, one a turn, for the stages that read
    rows (filter, train_apm, relabel, train_sft).

    A row's `prompt` is the conversation before the turn as a HelpSteer2 multi-turn prompt (earlier
    assistant turns are context, without their attributes, as `conversation_from_row` reads them
    back), its `response` the turn, its attribute columns the turn's own labels (none for an
    unlabelled turn, so a stage can still score it), and `conversation_id` (the tree id, else
    `file:line`) and `turn` (1 for a conversation's first assistant turn) say where it came from;
    OpenAssistant turns also keep their `message_id`. A turn that two paths of one tree share (each
    root-to-leaf path is a conversation) is one row.
    """
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for conversation in unit.conversations:
        meta = conversation.meta
        conversation_id = str(meta.get("message_tree_id") or f"{unit.input_file}:{unit.input_line}")
        message_ids = meta.get("message_ids")
        for index, turn in enumerate(conversation.turns):
            if turn.role != "Assistant":
                continue
            prompt = join_prompt_turns(conversation.turns[:index])
            if (prompt, turn.text) in seen:
                continue
            seen.add((prompt, turn.text))
            row: dict[str, Any] = {"prompt": prompt, "response": turn.text, **(turn.attributes or {})}
            row.update(conversation_id=conversation_id, turn=(index + 1) // 2)
            if isinstance(message_ids, list):
                row["message_id"] = message_ids[index]
            rows.append(row)
    return rows


@dataclass
class Counts:
    """Units in, and where each went; `reconciles` checks that none is lost."""

    input_rows: int = 0
    units: int = 0
    kept: int = 0
    filtered_by: Counter[str] = field(default_factory=Counter)
    rejected_by_field: Counter[str] = field(default_factory=Counter)
    conversations: int = 0

    def add(self, result: UnitResult) -> None:
        self.input_rows += result.rows
        self.units += 1
        if result.status == KEPT:
            self.kept += 1
            self.conversations += len(result.conversations)
        elif result.status == FILTERED:
            self.filtered_by[result.field] += 1
        else:
            self.rejected_by_field[result.field] += 1

    def to_dict(self) -> dict[str, Any]:
        filtered, rejected = sum(self.filtered_by.values()), sum(self.rejected_by_field.values())
        return {
            "input_rows": self.input_rows,
            "units": self.units,
            "kept": self.kept,
            "filtered": filtered,
            "filtered_by": dict(sorted(self.filtered_by.items())),
            "rejected": rejected,
            "rejected_by_field": dict(sorted(self.rejected_by_field.items())),
            "conversations": self.conversations,
            "reconciles": self.units == self.kept + filtered + rejected,
        }


@dataclass(frozen=True)
class SourceRead:
    """A whole source read in this process: the format found, every unit, and the counts."""

    input_format: str
    results: tuple[UnitResult, ...]
    counts: dict[str, Any]

    @property
    def conversations(self) -> list[Conversation]:
        return [c for r in self.results for c in r.conversations]

    @property
    def rejects(self) -> list[UnitResult]:
        return [r for r in self.results if r.status == REJECTED]


def read_source(source: str, options: ReadOptions | None = None) -> SourceRead:
    """Read a whole source (a file, a folder, hf:ID) as conversations, in this process: for
    notebooks, tests and sets that fit in memory (the export's Ray path reads file by file)."""
    options = options or ReadOptions()
    shards = resolve_source(source, options.hf_split)
    fmt = source_format(shards, options.input_format)
    results = tuple(read_shards(shards, fmt, options))
    counts = Counts()
    for result in results:
        counts.add(result)
    return SourceRead(fmt, results, counts.to_dict())
