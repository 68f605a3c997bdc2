"""Data sources: JSON Lines (plain or gzip), Parquet, folders of those, and Hugging Face datasets.

A source string is one of
  - a `.jsonl`, `.jsonl.gz` or `.parquet` file;
  - a folder: every such file below it, in sorted order, or a `save_to_disk` dataset folder;
  - `hf:ID` or a bare `owner/name` that is not a local path: `datasets.load_dataset(ID)`, which
    also takes a local folder laid out like a Hub dataset repo (`hf:/data/HelpSteer2`). A bare
    `owner/name` whose `owner` is a local folder is a mistyped path (`data/synht`), never a Hub id.

`resolve_source` runs on the driver, fails fast with the path when nothing can be read, and
splits the source into shards; `iter_raw_rows` reads one shard anywhere (a Ray task, a test).
Rows come out unparsed (`raw` is the JSON text) with the file and line they came from, so that a
bad row can be rejected with its exact location instead of failing the whole read.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
HF_PREFIX = "hf:"
HF_ROWS_PER_SHARD = 10_000
# A bare hub id: owner/name, no leading dot or slash (those are local paths).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(ValueError):
    """A data source that cannot be read at all."""


@dataclass(frozen=True)
class Shard:
    kind: str  # "jsonl", "jsonl.gz", "parquet", "hf", "hf-disk"
    path: str  # absolute file path, dataset folder or hub id
    order: int  # position of this shard in the source, for a deterministic row order
    split: str = ""
    start: int = 0
    stop: int = 0

    @property
    def label(self) -> str:
        """How rows of this shard name their file."""
        if self.kind.startswith("hf"):
            return f"{HF_PREFIX}{self.path}[{self.split}]" if self.split else f"{HF_PREFIX}{self.path}"
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()


def resolve_source(source: str, split: str = "train") -> list[Shard]:
    """The shards of `source`; raises `SourceError` naming the path when nothing is readable."""
    if source.startswith(HF_PREFIX):
        return _hf_shards(source[len(HF_PREFIX) :], split)
    path = Path(source).expanduser()
    if path.is_file():
        kind = _file_kind(path)
        if kind is None:
            raise SourceError(f"{path}: unsupported file type; allowed: {', '.join(FILE_SUFFIXES)}")
        _check_readable(path, kind)
        return [Shard(kind, str(path.resolve()), 0)]
    if path.is_dir():
        if _is_saved_dataset(path) or (path / "dataset_dict.json").is_file():
            return _disk_shards(path, split)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p))
        if not files:
            raise SourceError(f"{path}: folder holds no data files; allowed: {', '.join(FILE_SUFFIXES)}")
        shards = []
        for order, file in enumerate(files):
            kind = _file_kind(file)
            assert kind is not None
            _check_readable(file, kind)
            shards.append(Shard(kind, str(file.resolve()), order))
        return shards
    if _HUB_ID.match(source) and not source.lower().endswith(FILE_SUFFIXES) and not path.parent.exists():
        return _hf_shards(source, split)
    raise SourceError(
        f"data source not found: {source} (resolved to {path.resolve()}); give a "
        f"{', '.join(FILE_SUFFIXES)} file, a folder of them, or {HF_PREFIX}DATASET_ID"
    )


def _check_readable(path: Path, kind: str) -> None:
    """Open the file the way the reader will, so that an unreadable input fails before Ray starts."""
    try:
        if kind == "parquet":
            pq.ParquetFile(path)
        elif kind == "jsonl.gz":
            with gzip.open(path, "rb") as fh:
                fh.read(1)
        else:
            with open(path, "rb") as fh:
                fh.read(1)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file cannot be read
        raise SourceError(f"{path}: cannot be read as {kind}: {exc}") from exc


def _load_hf(path: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; report them all alike
        raise SourceError(f"{HF_PREFIX}{path}: cannot load split {split!r}: {exc}") from exc


def _load_disk(path: str, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - a damaged folder fails in many ways
        raise SourceError(f"{path}: cannot load saved dataset: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SourceError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _hf_shards(dataset_id: str, split: str) -> list[Shard]:
    rows = len(_load_hf(dataset_id, split))
    return _range_shards("hf", dataset_id, split, rows)


def _disk_shards(folder: Path, split: str) -> list[Shard]:
    rows = len(_load_disk(str(folder), split))
    return _range_shards("hf-disk", str(folder.resolve()), split, rows)


def _range_shards(kind: str, path: str, split: str, rows: int) -> list[Shard]:
    if rows == 0:
        raise SourceError(f"{path}: split {split!r} has no rows")
    starts = range(0, rows, HF_ROWS_PER_SHARD)
    return [
        Shard(kind, path, order, split, start, min(start + HF_ROWS_PER_SHARD, rows))
        for order, start in enumerate(starts)
    ]


def raw_row(shard: Shard, line: int, raw: str, read_error: str = "") -> dict[str, Any]:
    """The fixed shape every reader yields (a stable schema for Ray Data blocks)."""
    return {
        "input_file": shard.label,
        "input_line": line,
        "input_order": shard.order,
        "raw": raw,
        "read_error": read_error,
    }


def iter_raw_rows(shard: Shard) -> Iterator[dict[str, Any]]:
    """Rows of one shard. A read failure midway becomes one row with `read_error` set."""
    if shard.kind in ("jsonl", "jsonl.gz"):
        yield from _iter_jsonl(shard)
    elif shard.kind == "parquet":
        yield from _iter_parquet(shard)
    elif shard.kind in ("hf", "hf-disk"):
        loader = _load_hf if shard.kind == "hf" else _load_disk
        dataset = loader(shard.path, shard.split).select(range(shard.start, shard.stop))
        for offset, row in enumerate(dataset):
            yield raw_row(shard, shard.start + offset + 1, _to_json(row))
    else:
        raise SourceError(f"{shard.path}: unknown shard kind {shard.kind!r}")


def _iter_jsonl(shard: Shard) -> Iterator[dict[str, Any]]:
    opener = gzip.open if shard.kind == "jsonl.gz" else open
    line_no = 0
    try:
        with opener(shard.path, "rb") as fh:
            for line_no, data in enumerate(fh, start=1):
                if not data.strip():
                    continue  # blank lines are not rows (a trailing newline, say)
                try:
                    text = data.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    yield raw_row(shard, line_no, repr(data[:200]), f"line is not UTF-8: {exc}")
                    continue
                yield raw_row(shard, line_no, text)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        yield raw_row(shard, line_no + 1, "", f"file read failed after line {line_no}: {exc}")


def _iter_parquet(shard: Shard) -> Iterator[dict[str, Any]]:

    line_no = 0
    try:
        for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                line_no += 1
                yield raw_row(shard, line_no, _to_json(row))
    except Exception as exc:  # noqa: BLE001 - a corrupt page: report where it stopped
        yield raw_row(shard, line_no + 1, "", f"file read failed after row {line_no}: {exc}")


def _to_json(row: dict[str, Any]) -> str:
    # default=str keeps values JSON has no type for (timestamps, decimals) readable.
    return json.dumps(row, ensure_ascii=False, default=str)


# --- Work units: fixed row ranges of a source, for stages that must resume -------------------


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one shard, in the shard's row order. `index` numbers the unit in the
    whole source, so a stage can name its output part after it and skip it on a re-run."""

    shard: Shard
    index: int
    start: int
    stop: int

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard.to_dict(), "index": self.index, "start": self.start, "stop": self.stop}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Unit:
        return cls(Shard(**data["shard"]), data["index"], data["start"], data["stop"])


def count_rows(shard: Shard) -> int:
    if shard.kind in ("jsonl", "jsonl.gz"):
        opener = gzip.open if shard.kind == "jsonl.gz" else open
        with opener(shard.path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    if shard.kind == "parquet":
        return int(pq.ParquetFile(shard.path).metadata.num_rows)
    return shard.stop - shard.start


def plan_units(shards: list[Shard], rows_per_unit: int) -> list[Unit]:
    """Cut every shard into units of at most `rows_per_unit` rows, numbered in source order."""
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be >= 1, got {rows_per_unit}")
    units: list[Unit] = []
    for shard in shards:
        offset = shard.start if shard.kind.startswith("hf") else 0
        rows = count_rows(shard)
        for start in range(0, rows, rows_per_unit):
            stop = min(start + rows_per_unit, rows)
            units.append(Unit(shard, len(units), offset + start, offset + stop))
    return units


def read_unit(unit: Unit) -> pa.Table:
    """The unit's rows with their columns as the source has them (types kept for Parquet and
    Hugging Face sources; inferred from the JSON values for JSON Lines)."""
    shard = unit.shard
    if shard.kind == "parquet":
        return pq.read_table(shard.path).slice(unit.start, unit.stop - unit.start)
    if shard.kind in ("hf", "hf-disk"):
        loader = _load_hf if shard.kind == "hf" else _load_disk
        table: pa.Table = (
            loader(shard.path, shard.split).select(range(unit.start, unit.stop)).with_format("arrow")[:]
        )
        return table
    return rows_table([row for _, row in read_unit_rows(unit)])


def read_unit_rows(unit: Unit) -> list[tuple[int, dict[str, Any]]]:
    """A JSON Lines unit's rows as parsed, each with its line number: what a caller checks
    before the columns are typed (a prompt that is 5 in one row and text in the next has no type)."""
    shard = unit.shard
    rows = []
    for index, raw in enumerate(iter_raw_rows(shard)):
        if index < unit.start:
            continue
        if index >= unit.stop:
            break
        if raw["read_error"]:
            raise SourceError(f"{shard.path}:{raw['input_line']}: {raw['read_error']}")
        try:
            row = json.loads(raw["raw"])
        except json.JSONDecodeError as exc:
            raise SourceError(
                f"{shard.path}:{raw['input_line']}: not valid JSON ({exc.msg}); run the filter stage first"
            ) from None
        if not isinstance(row, dict):
            raise SourceError(
                f"{shard.path}:{raw['input_line']}: expected a JSON object; run the filter stage first"
            )
        rows.append((int(raw["input_line"]), row))
    return rows


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table; every key of every row becomes a column (from_pylist would take the
    first row's keys only)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({key: [row.get(key) for row in rows] for key in keys})


def parquet_files(folder: Path, producer: str = "the stage that writes it") -> list[Path]:
    """The `*.parquet` files of a stage output folder (a split, relabel parts), in name order."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet files; run {producer} first")
    return files


def read_parquet_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of a stage output folder, as dicts, in file order (training data fits in RAM)."""
    return [row for f in parquet_files(folder) for row in pq.read_table(f).to_pylist()]
