"""Export a dataset as NeMo-Aligner SteerLM files: AC-SFT chat JSON Lines or regression JSON Lines.

    helpsteer export --format nemo-acsft --data SRC --out FILE
    helpsteer export --format nemo-regression --data SRC --out FILE
    helpsteer export --format nemo-acsft --data SRC --out DIR --ray      # big sets: Ray Data
    python -m ray_jobs.export_data format=nemo-acsft data=SRC out=DIR ray=true

SRC is any source `helpsteer_core.conversation_sources` reads: HelpSteer-style rows (JSON Lines,
our Parquet folders such as runs/filtered/train or runs/relabelled), OpenAssistant tree exports or
message tables, NeMo-Aligner files. The defaults read as NeMo-Aligner's scripts do (every language,
deleted messages and tree state kept, labels rounded half to even), so the output is byte for byte
what those scripts write for the same rows.

Single file (the default): FILE, written whole or not at all; an existing FILE is replaced only
with `overwrite=true`. Rejected input goes to FILE.rejects.jsonl (file, line, field, reason, raw),
written only when there is some.

`ray=true`: OUT is a folder. Each input file (a shard of a Hub dataset) is converted by one Ray
Data task into `part-NNNNN.jsonl`, numbered in input order, so the parts concatenated in name order
are the single-file output. Beside them: rejects/part-NNNNN.jsonl, stats.json. The message table is
grouped into trees within each file (a Hub split keeps its trees whole; a tree cut across files is
rejected, never half read).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from helpsteer_core.config import StrictModel, dump_config, resolve_path
from helpsteer_core.conversation_sources import Counts, ReadOptions, UnitResult, read_shards, source_format
from helpsteer_core.nemo_format import ACSFT, acsft_line, regression_lines
from helpsteer_core.outputs import OutputError, prepare_output, publish
from helpsteer_core.readers import HF_PREFIX, Shard, count_rows, resolve_source

log = logging.getLogger("helpsteer.export")
STAGE = "export"


class ExportConfig(StrictModel):
    """What to export, where, and how the source is read."""

    data: str  # a file, a folder, hf:ID or owner/name
    out: str  # a file; a folder with ray=true
    format: Literal["nemo-acsft", "nemo-regression"]
    read: ReadOptions = ReadOptions()
    ray: bool = False  # convert every input file in a Ray Data task, writing one part per file
    overwrite: bool = False  # replace an existing single-file `out`


def lines_of(results: Iterable[UnitResult], fmt: str) -> Iterator[str]:
    """The output lines of the kept units, in input order."""
    for result in results:
        for conversation in result.conversations:
            if fmt == ACSFT:
                yield acsft_line(conversation)
            else:
                yield from regression_lines(conversation)


def _source(config: ExportConfig) -> tuple[str, list[Shard]]:
    local = resolve_path(config.data)
    source = str(local) if not config.data.startswith(HF_PREFIX) and local.exists() else config.data
    return source, resolve_source(source, config.read.hf_split)


def _convert(
    shards: list[Shard], fmt: str, out_file: Path, rejects_file: Path, config: ExportConfig
) -> dict[str, Any]:
    """Convert `shards` into `out_file` (and their rejects into `rejects_file`, if any); counts."""
    counts = Counts()
    written = 0
    rejects = None
    try:
        with out_file.open("w", encoding="utf-8") as fh:
            for result in read_shards(shards, fmt, config.read):
                counts.add(result)
                for line in lines_of([result], config.format):
                    fh.write(line + "\n")
                    written += 1
                if result.status == "rejected":
                    if rejects is None:
                        rejects = rejects_file.open("w", encoding="utf-8")
                    rejects.write(json.dumps(result.reject_record(), ensure_ascii=False) + "\n")
    finally:
        if rejects is not None:
            rejects.close()
    stats = counts.to_dict()
    source_rows = sum(count_rows(shard) for shard in shards)
    stats.update(source_rows=source_rows, lines_written=written)
    stats["reconciles"] = stats["reconciles"] and source_rows == stats["input_rows"]
    return stats


def _export_part(item: dict[str, Any], fmt: str, staging: str, config: ExportConfig) -> dict[str, Any]:
    """A Ray Data task: one input shard into `part-NNNNN.jsonl`; returns its counts."""
    shard = Shard(**item)
    name = f"part-{shard.order:05d}.jsonl"
    stats = _convert([shard], fmt, Path(staging) / name, Path(staging) / "rejects" / name, config)
    return {"part": name, "stats_json": json.dumps(stats)}


def _sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, bool):
                total[key] = total.get(key, True) and value
            elif isinstance(value, dict):
                merged = total.setdefault(key, {})
                for name, n in value.items():
                    merged[name] = merged.get(name, 0) + n
            else:
                total[key] = total.get(key, 0) + value
    return total


def run(config: ExportConfig) -> dict[str, Any]:
    """Export; returns the counts (also printed, and written to stats.json with ray=true)."""
    source, shards = _source(config)  # fails fast, naming the path
    fmt = source_format(shards, config.read.input_format)
    out = resolve_path(config.out)
    log.info("export: %s (%s, %d file(s)) -> %s %s", source, fmt, len(shards), config.format, out)
    if config.ray:
        stats = _run_ray(config, fmt, shards, out)
    else:
        stats = _run_single(config, fmt, shards, out)
    stats.update(source=source, input_format=fmt, format=config.format)
    log.info(
        "export: %d unit(s) (%d row(s)): kept %d, filtered %d %s, rejected %d; "
        "%d conversation(s), %d line(s) -> %s",
        stats["units"],
        stats["input_rows"],
        stats["kept"],
        stats["filtered"],
        stats["filtered_by"],
        stats["rejected"],
        stats["conversations"],
        stats["lines_written"],
        out,
    )
    return stats


def _run_single(config: ExportConfig, fmt: str, shards: list[Shard], out: Path) -> dict[str, Any]:
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give a file (or ray=true to write parts into a folder)")
    if out.exists() and not config.overwrite:
        raise OutputError(f"{out} exists; nothing was written: give another --out or pass --overwrite")
    rejects = out.with_name(out.name + ".rejects.jsonl")
    partial, partial_rejects = (
        out.with_name(f".{out.name}.partial"),
        out.with_name(f".{rejects.name}.partial"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_rejects.unlink(missing_ok=True)
    try:
        stats = _convert(shards, fmt, partial, partial_rejects, config)
    except BaseException:
        partial.unlink(missing_ok=True)
        partial_rejects.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    if partial_rejects.exists():
        os.replace(partial_rejects, rejects)
        log.warning("export: %d rejected unit(s), with reasons, in %s", stats["rejected"], rejects)
    else:
        rejects.unlink(missing_ok=True)  # an earlier run's rejects would describe other input
    return stats


def whole_splits(shards: list[Shard]) -> list[Shard]:
    """A Hugging Face split's row ranges merged back into one shard: a message table's tree may
    straddle a range boundary, and a task must see whole trees."""
    merged: list[Shard] = []
    for shard in shards:
        last = merged[-1] if merged else None
        if (
            last
            and shard.kind.startswith("hf")
            and (last.kind, last.path, last.split)
            == (
                shard.kind,
                shard.path,
                shard.split,
            )
        ):
            merged[-1] = Shard(last.kind, last.path, last.order, last.split, last.start, shard.stop)
        else:
            merged.append(Shard(shard.kind, shard.path, len(merged), shard.split, shard.start, shard.stop))
    return merged


def _run_ray(config: ExportConfig, fmt: str, shards: list[Shard], out: Path) -> dict[str, Any]:
    import ray

    from ray_jobs.runtime import ensure_ray, quiet_ray_data

    if fmt == "oasst-messages":
        shards = whole_splits(shards)
    staging = prepare_output(out, STAGE)  # a folder this stage did not write is refused now
    (staging / "rejects").mkdir(parents=True)
    ensure_ray()
    quiet_ray_data()
    parts = (
        ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
        .map(_export_part, fn_kwargs={"fmt": fmt, "staging": str(staging), "config": config})
        .take_all()
    )
    stats = _sum_stats([json.loads(p["stats_json"]) for p in parts])
    stats["parts"] = sorted(p["part"] for p in parts)
    (staging / "config.yaml").write_text(dump_config(config))
    (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    publish(staging, out, STAGE)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    from ray_jobs.runtime import stage_main

    return stage_main(__doc__, "python -m ray_jobs.export_data", ExportConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
