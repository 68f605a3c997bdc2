"""Filtering stage: validate, filter, de-duplicate and split a HelpSteer-style dataset on Ray Data.

    python -m ray_jobs.filter_data --config configs/filter_data.yaml [key=value ...]
    helpsteer filter --data SRC --out DIR
    ray job submit --working-dir . -- python -m ray_jobs.filter_data --config configs/filter_data.yaml

Writes, under `out`:
    train/, validation/   kept rows (Parquet): prompt, response, the attribute columns the data
                          has, every extra input column untouched, input_file and input_line
    filtered/             valid rows a filter removed (Parquet), with `filter` and `reason`
    rejects/              unusable rows (JSON Lines): input_file, input_line, field, reason, raw
    stats.json            counts per file and in total: input rows = kept + filtered + rejected

A conversation source (`input_format`: OpenAssistant trees or message tables, NeMo-Aligner AC-SFT
or regression files; `auto` tells them from the first row) is read as one row per assistant turn:
the conversation before it as a HelpSteer2 multi-turn prompt, the turn as the response, its own
labels (OpenAssistant's quality, toxicity, humor, creativity as 0-4) as attribute columns, and
`conversation_id`, `turn` (and `message_id`) as extra columns; every turn of a conversation goes to
one split. There a row is a turn: a tree the reader rejects, or leaves out by an `oasst` option
(`languages`, `tree_states`, `drop_deleted`, `min_label_count`), counts as one row, rejected
(with the reader's field and reason) or filtered (under that option's name).
    config.yaml, attribute_schema.json
    .helpsteer-output.json  marks the folder as this stage's output: only such a folder is
                          replaced, and only once the new output is complete (helpsteer_core.outputs)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import field_validator
from ray.data.context import ShuffleStrategy

from helpsteer_core.attributes import STEERLM
from helpsteer_core.config import StrictModel, dump_config, resolve_path
from helpsteer_core.conversation_sources import KEPT as UNIT_KEPT
from helpsteer_core.conversation_sources import (
    RAW_PREVIEW,
    DataSource,
    InputFormat,
    ReadOptions,
    check_source_names,
    read_units,
    source_format,
    turn_rows,
)
from helpsteer_core.filters import (
    FILTER_NAMES,
    FILTERED,
    KEPT,
    REJECTED,
    FilterConfig,
    SplitConfig,
    assess_rows,
    find_duplicates,
)
from helpsteer_core.model_sources import count_tokens, load_tokenizer
from helpsteer_core.oasst import OasstOptions
from helpsteer_core.outputs import prepare_output, publish
from helpsteer_core.readers import HF_PREFIX, Shard, iter_raw_rows, resolve_source
from ray_jobs.runtime import ensure_ray, quiet_ray_data, stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.filter_data")
STAGE = "filter"  # the name in every output's marker file
SCHEMA = STEERLM
SPLITS = ("train", "validation")
OUTPUT_FOLDERS = (*SPLITS, "filtered", "rejects")
POSITION = ("input_order", "input_line", "input_turn")  # where a row came from, in input order


class FilterSettings(StrictModel):
    """How to filter; the pipeline profile's `filter:` section."""

    hf_split: str = "train"  # which split of a Hugging Face dataset to read
    # The source's format: auto (from its first row), helpsteer, or a conversation format read as
    # one row per assistant turn (oasst-trees, oasst-messages, nemo-acsft, nemo-regression).
    input_format: InputFormat = "auto"
    oasst: OasstOptions = OasstOptions()  # which OpenAssistant trees and messages to read
    filters: FilterConfig = FilterConfig()
    split: SplitConfig = SplitConfig()
    batch_size: int = 1024  # rows per Ray Data batch for parsing and tokenizing


# Settings that change only how fast the stage runs, never its output: left out of cache keys.
SPEED_ONLY = ("batch_size",)  # rows are parsed, checked and tokenized one at a time


class FilterStageConfig(FilterSettings):
    """The filtering stage: what to read, where to write, and the settings."""

    # A file, a folder, hf:ID or owner/name (helpsteer_core.readers), read with the settings above;
    # or several sources, each with its own reader settings: rows carry their source's name in
    # `data_source`, and stats.json counts per source.
    data: str | list[DataSource]
    out: str  # output folder; replaced as a whole when the stage succeeds
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("data")
    @classmethod
    def _distinct_sources(cls, data: str | list[DataSource]) -> str | list[DataSource]:
        return data if isinstance(data, str) else check_source_names(data)


@dataclass(frozen=True)
class _Source:
    """One source as the stage reads it: its shards (numbered across sources), format, options."""

    name: str | None  # None: a single `data` string (its rows get no data_source column)
    location: str
    input_format: str
    oasst: OasstOptions
    shards: list[Shard]


def _resolve_sources(config: FilterStageConfig) -> list[_Source]:
    """Every source's shards, numbered on across sources so that input order spans them all;
    fails fast, naming the path, before any Ray work."""
    if isinstance(config.data, str):
        single = {"name": "_", "path": config.data, "input_format": config.input_format}
        specs = [DataSource.model_validate(single | {"hf_split": config.hf_split, "oasst": config.oasst})]
    else:
        specs = list(config.data)
    sources, order = [], 0
    for spec in specs:
        local = resolve_path(spec.path)
        # Hub ids and hf: sources are not paths; a local path is made absolute for Ray's workers.
        location = str(local) if not spec.path.startswith(HF_PREFIX) and local.exists() else spec.path
        shards = [replace(s, order=order + s.order) for s in resolve_source(location, spec.hf_split)]
        order += len(shards)
        name = spec.name if not isinstance(config.data, str) else None
        fmt = source_format(shards, spec.input_format)
        sources.append(_Source(name, location, fmt, spec.oasst, shards))
    return sources


def _read_shard(item: dict[str, Any]) -> list[dict[str, Any]]:
    """A shard's reader rows, each with its source's name (`data_source`, several sources only);
    a conversation source's units become one row per assistant turn, or one row carrying the
    reader's verdict (`unit_status`) for a unit rejected or left out."""
    named = {"data_source": item["source"]} if item["source"] is not None else {}
    oasst = OasstOptions.model_validate(item["oasst"])
    return [named | row for row in _shard_rows(Shard(**item["shard"]), item["format"], oasst)]


def _shard_rows(shard: Shard, fmt: str, oasst: OasstOptions) -> list[dict[str, Any]]:
    raws = iter_raw_rows(shard)
    if fmt == "helpsteer":
        return list(raws)
    rows: list[dict[str, Any]] = []
    order = shard.order
    for unit in read_units(raws, fmt, ReadOptions(input_format=fmt, oasst=oasst)):  # type: ignore[arg-type]
        where = {"input_file": unit.input_file, "input_line": unit.input_line, "input_order": order}
        if unit.status != UNIT_KEPT:
            verdict = {"unit_status": unit.status, "unit_field": unit.field, "unit_reason": unit.reason}
            rows.append(where | verdict | {"input_turn": 0, "raw": unit.raw[:RAW_PREVIEW], "read_error": ""})
            continue
        for number, row in enumerate(turn_rows(unit)):
            text = json.dumps(row, ensure_ascii=False)
            rows.append(where | {"input_turn": number, "raw": text, "read_error": ""})
    return rows


def _assess(batch: pa.Table, filters: FilterConfig, split: SplitConfig) -> pa.Table:
    # A plain task, not an actor pool: actors would hold every CPU of a small machine and starve
    # the read tasks. The tokenizer is cached per worker process (Ray reuses workers).
    tokenizer = load_tokenizer(filters.tokenizer)
    return assess_rows(
        batch.to_pylist(), filters, split, lambda texts: count_tokens(tokenizer, texts), SCHEMA
    )


def _mark_duplicates(batch: pa.Table, drop: set[tuple[int, int]]) -> pa.Table:
    if not drop:
        return batch
    rows = batch.to_pylist()
    for row in rows:
        if row["status"] == KEPT and (row["input_order"], row["input_line"], row["input_turn"]) in drop:
            row.update(
                status=FILTERED,
                filter="duplicate",
                split="",
                reason="same prompt and response as an earlier row",
            )
    return pa.Table.from_pylist(rows, schema=batch.schema)


def _output_rows(
    batch: pa.Table, attributes: list[str], extra_keys: list[str], with_filter: bool
) -> pa.Table:
    """Kept or filtered rows in their published shape: extras expanded back into columns."""
    columns: dict[str, Any] = {
        "prompt": batch.column("prompt"),
        "response": batch.column("response"),
        **{name: batch.column(name) for name in attributes},
    }
    # A conversation source's unit left out whole (a tree in another language) has no row fields.
    extras = [json.loads(text) if text else {} for text in batch.column("extra_json").to_pylist()]
    for key in extra_keys:
        values = [e.get(key) for e in extras]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types in one extra column: keep every value, as its JSON text.
            columns[key] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    columns["input_file"] = batch.column("input_file")
    columns["input_line"] = batch.column("input_line")
    if with_filter:
        columns["filter"] = batch.column("filter")
        columns["reason"] = batch.column("reason")
    return pa.table(columns)


def _merge_keys(key_lists: list[str]) -> list[str]:
    merged: list[str] = []
    for text in sorted(key_lists):
        for key in json.loads(text) if text else []:  # "": a unit left out whole has no row fields
            if key not in merged:
                merged.append(key)
    return merged


# What the statistics are grouped by: a handful of values each, so the groups number in the
# tens whatever the row count (files x status x filter or field x split x extra-column sets).
GROUP_KEYS = ["input_file", "status", "filter", "field", "split", "extra_keys"]


def _has(name: str) -> str:
    return f"has_{name}"


def _group_counts(batch: pa.Table) -> pa.Table:
    """One row per group of this batch: its row count and how many rows carry each attribute."""
    columns = {key: batch.column(key) for key in GROUP_KEYS}
    columns["extra_keys"] = pc.fill_null(columns["extra_keys"], "")  # rejected rows have none
    columns["rows"] = pa.array([1] * batch.num_rows, pa.int64())
    for name in SCHEMA.names:
        columns[_has(name)] = pc.cast(pc.is_valid(batch.column(name)), pa.int64())
    summed = ["rows", *(_has(n) for n in SCHEMA.names)]
    grouped = pa.table(columns).group_by(GROUP_KEYS).aggregate([(c, "sum") for c in summed])
    return grouped.rename_columns([c.removesuffix("_sum") for c in grouped.column_names])


def aggregate_groups(ds: ray.data.Dataset) -> list[dict[str, Any]]:
    """Group counts: partial counts per batch on Ray Data, folded on the driver as they stream in.

    No shuffle (on small clusters one costs more than the whole stage); the driver holds one
    running count per group, never a row per input row."""
    summed = ["rows", *(_has(n) for n in SCHEMA.names)]
    totals: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    partials = ds.map_batches(_group_counts, batch_format="pyarrow", batch_size=None)
    for batch in partials.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            counts = totals[tuple(row[k] for k in GROUP_KEYS)]
            for column in summed:
                counts[column] += row[column]
    return [
        {**dict(zip(GROUP_KEYS, key, strict=True)), **{c: counts[c] for c in summed}}
        for key, counts in totals.items()
    ]


def _count(groups: list[dict[str, Any]]) -> dict[str, Any]:
    filtered: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for g in groups:
        if g["status"] == FILTERED:
            filtered[g["filter"]] += g["rows"]
        elif g["status"] == REJECTED:
            rejected[g["field"]] += g["rows"]
        elif g["status"] == KEPT:
            kept[g["split"]] += g["rows"]
    counts = {
        "input_rows": sum(g["rows"] for g in groups),
        "kept": sum(kept.values()),
        "train": kept.get("train", 0),
        "validation": kept.get("validation", 0),
        "filtered": sum(filtered.values()),
        # The filters', then any option of a conversation source's reader that left units out.
        "filtered_by": {name: filtered.get(name, 0) for name in FILTER_NAMES}
        | {name: count for name, count in sorted(filtered.items()) if name not in FILTER_NAMES},
        "rejected": sum(rejected.values()),
        "rejected_by_field": dict(sorted(rejected.items())),
    }
    counts["reconciles"] = counts["input_rows"] == counts["kept"] + counts["filtered"] + counts["rejected"]
    return counts


def compute_stats(groups: list[dict[str, Any]], shards: list[Shard]) -> dict[str, Any]:
    """Counts in total and per file from the aggregated groups (`aggregate_groups`)."""
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for group in groups:
        by_file[group["input_file"]].append(group)
    files = {shard.label: _count(by_file.get(shard.label, [])) for shard in shards}
    return {"total": _count(groups), "files": files}


def _later_copies(group: pa.Table) -> pa.Table:
    """The rows of one dedup_key group to drop: all but the first in input order."""
    positions = zip(*(group.column(c).to_pylist() for c in POSITION), strict=True)
    drop = sorted(find_duplicates(("k", *p) for p in positions))
    return pa.table(
        {c: [p[i] for p in drop] for i, c in enumerate(POSITION)},
        schema=pa.schema([(c, pa.int64()) for c in POSITION]),
    )


def run(config: FilterStageConfig) -> dict[str, Any]:
    """Run the stage; returns the stats written to `out/stats.json`."""
    started = time.perf_counter()
    out = resolve_path(config.out)
    staging = prepare_output(out, STAGE)  # a folder this stage did not write is refused now
    sources = _resolve_sources(config)  # fails fast, naming the path
    shards = [shard for source in sources for shard in source.shards]
    for source in sources:
        named = f" ({source.name})" if source.name else ""
        log.info(
            "filter: %d shard(s) of %s from %s%s",
            len(source.shards),
            source.input_format,
            source.location,
            named,
        )
    log.info("filter: -> %s", out)
    location = sources[0].location if isinstance(config.data, str) else [s.location for s in sources]
    ensure_ray()
    quiet_ray_data()
    # The de-duplication's groupby as tasks (a sort shuffle): the default hash shuffle starts
    # aggregator actors that can wait for CPUs the stage's own tasks hold on a small cluster.
    ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    items = [
        {"shard": shard.to_dict(), "source": s.name, "format": s.input_format, "oasst": s.oasst.model_dump()}
        for s in sources
        for shard in s.shards
    ]
    with stage_run(
        "filter_data",
        config,
        config.tracking,
        SCHEMA,
        {"data": location if isinstance(location, str) else json.dumps(location)},
    ) as tracked:
        assessed = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .flat_map(_read_shard)
            .map_batches(
                _assess,
                fn_kwargs={"filters": config.filters, "split": config.split},
                batch_format="pyarrow",
                batch_size=config.batch_size,
            )
            .materialize()
        )
        drop: set[tuple[int, int]] = set()
        if config.filters.drop_duplicates:
            # Grouped by key on Ray Data: the driver receives the positions of the later copies
            # only (two integers per duplicate), never a key per row.
            copies = (
                assessed.filter(expr=f"status == '{KEPT}'")
                .select_columns(["dedup_key", *POSITION])
                .groupby("dedup_key")
                .map_groups(_later_copies, batch_format="pyarrow")
            )
            drop = {tuple(r[c] for c in POSITION) for r in copies.iter_rows()}
        final = assessed.map_batches(
            _mark_duplicates, fn_kwargs={"drop": drop}, batch_format="pyarrow"
        ).materialize()
        groups = aggregate_groups(final)
        stats = compute_stats(groups, shards)
        if not isinstance(config.data, str):
            stats["sources"] = {
                s.name: _count([g for g in groups if g["input_file"] in {h.label for h in s.shards}])
                for s in sources
            }
        valid = [g for g in groups if g["status"] != REJECTED]
        attributes = [a for a in SCHEMA.names if any(g[_has(a)] for g in valid)]
        extra_keys = _merge_keys(sorted({g["extra_keys"] for g in valid}))

        for name in OUTPUT_FOLDERS:
            (staging / name).mkdir(parents=True)
        for split_name in SPLITS:
            _write_parquet(
                final.filter(expr=f"status == '{KEPT}' and split == '{split_name}'"),
                staging / split_name,
                attributes,
                extra_keys,
                with_filter=False,
            )
        _write_parquet(
            final.filter(expr=f"status == '{FILTERED}'"),
            staging / "filtered",
            attributes,
            extra_keys,
            with_filter=True,
        )
        rejects = final.filter(expr=f"status == '{REJECTED}'").select_columns(
            ["input_file", "input_line", "field", "reason", "raw"]
        )
        _write_rejects(rejects, staging / "rejects" / "rejects.jsonl")

        elapsed = time.perf_counter() - started
        stats.update(
            source=location,
            input_format=sources[0].input_format
            if isinstance(config.data, str)
            else {s.name: s.input_format for s in sources},
            attributes=attributes,
            extra_columns=extra_keys,
            attribute_schema=SCHEMA.to_dict(),
            seconds=round(elapsed, 3),
            rows_per_second=round(stats["total"]["input_rows"] / elapsed, 1),
        )
        (staging / "config.yaml").write_text(dump_config(config))
        SCHEMA.save(staging)
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        publish(staging, out, STAGE)
        tracked.log_metrics(stats["total"])
        tracked.log_metrics({"rows_per_second": stats["rows_per_second"]})
        tracked.log_outputs({"stats.json": out / "stats.json", "rejects": out / "rejects", "out": out})
    total = stats["total"]
    log.info(
        "filter: %d rows in %.1fs: kept %d (train %d, validation %d), filtered %d %s, rejected %d -> %s",
        total["input_rows"],
        elapsed,
        total["kept"],
        total["train"],
        total["validation"],
        total["filtered"],
        total["filtered_by"],
        total["rejected"],
        out,
    )
    if total["rejected"]:
        log.warning("filter: %d rejected rows, with reasons, in %s", total["rejected"], out / "rejects")
    return stats


def _write_parquet(
    ds: ray.data.Dataset, folder: Path, attributes: list[str], extra_keys: list[str], with_filter: bool
) -> None:
    ds.map_batches(
        _output_rows,
        fn_kwargs={"attributes": attributes, "extra_keys": extra_keys, "with_filter": with_filter},
        batch_format="pyarrow",
    ).write_parquet(str(folder))


def _write_rejects(rejects: ray.data.Dataset, path: Path) -> None:
    """Rejects as one readable JSON Lines file (streamed: the driver never holds them all)."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rejects.iter_rows():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.filter_data", FilterStageConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
