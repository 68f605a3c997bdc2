"""Relabel a dataset with the Attribute Prediction Model, in batch, on a Ray Data actor pool.

    python -m ray_jobs.relabel --config configs/relabel.yaml [key=value ...]
    helpsteer relabel --apm runs/apm --data runs/filtered/train --out runs/relabelled
    ray job submit --working-dir . -- python -m ray_jobs.relabel --config configs/relabel.yaml \
        apm=/mnt/runs/apm data=/mnt/data/unlabelled out=/mnt/runs/relabelled

The source is cut into work units (fixed row ranges). Each unit goes to one actor of the pool,
which loads the APM once, sorts the unit's rows by length, predicts in batches formed by a token
budget, and writes `out/part-NNNNNN.parquet` atomically. Every input column is kept untouched;
per attribute the APM was trained on, `apm_<name>` (float) and `apm_<name>_int` (rounded and
clipped to 0-4) are added, with `apm_model` and `apm_schema` for provenance. Human labels are
never overwritten. A row with no usable prompt or response (missing, null, not a string, empty)
is not predicted: it goes to `out/rejects/part-NNNNNN.jsonl` with its file, line, field and
reason, and input rows = output rows + rejected rows (+ rows of other sources, left out and counted
per source when `sources` names the ones to relabel). A re-run after an interruption skips the
parts already written, so every input row ends up in exactly one output or reject row;
`restart=true` (the pipeline's force) re-predicts every part into a staging folder and publishes it
when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field

from helpsteer_core.apm import AttributePredictionModel, load_trained_attributes, predict
from helpsteer_core.attributes import STEERLM, load_and_check_schema
from helpsteer_core.config import StrictModel, dump_config, resolve_path
from helpsteer_core.conversation_sources import SOURCE_COLUMN
from helpsteer_core.fingerprints import file_digest
from helpsteer_core.metrics import round_clip
from helpsteer_core.outputs import OutputError, mark_output, prepare_output, publish
from helpsteer_core.readers import (
    HF_PREFIX,
    SourceError,
    Unit,
    plan_units,
    read_unit,
    read_unit_rows,
    resolve_source,
    rows_table,
)
from helpsteer_core.records import TEXT_FIELDS, RowError, check_texts
from ray_jobs.console import Progress
from ray_jobs.runtime import ensure_ray, quiet_ray_data, stage_main
from ray_jobs.tracking import TrackingConfig, stage_run

log = logging.getLogger("helpsteer.relabel")
SCHEMA = STEERLM
MANIFEST = "relabel_manifest.json"
REJECTS = "rejects"  # out/rejects/part-NNNNNN.jsonl: rows of that unit with no usable prompt or response
OTHER_SOURCES = "other_sources"  # out/other_sources/part-NNNNNN.json: rows of that unit `sources` left out


class RelabelSettings(StrictModel):
    """How to relabel; the pipeline profile's `relabel:` section."""

    rows_per_unit: int = Field(512, ge=1)  # rows per output part (the unit of resumption)
    max_tokens: int = Field(16384, ge=64)  # padded tokens per forward pass
    actors: int = Field(2, ge=1)  # size of the actor pool
    cpus_per_actor: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    hf_split: str = "train"
    # Only rows of these sources (`data_source`, the filter stage's several-source runs): the
    # sources AC-SFT conditions on the APM's labels for. Other rows are left out, counted per part
    # (`other_sources/`); null relabels every row.
    sources: list[str] | None = None


# Settings that change only how fast relabelling runs: left out of cache keys. The pool's size and
# devices, and the token budget that groups rows into forward passes (padding is masked; the
# predictions agree to float rounding). Not rows_per_unit: it cuts the output into its parts.
SPEED_ONLY = ("actors", "cpus_per_actor", "gpus_per_actor", "max_tokens")


class RelabelConfig(RelabelSettings):
    """The relabel stage."""

    apm: str  # a trained APM folder (train_apm's `out`)
    data: str  # any reader source; the filter stage's train/ or validation/ folder, say
    out: str  # folder of Parquet parts; an interrupted run continues where it stopped
    # Re-predict every part: into a staging folder, published when complete (the old output stays
    # intact until then), instead of continuing the parts already in `out`.
    restart: bool = False
    tracking: TrackingConfig = TrackingConfig()


class Relabeler:
    """Ray Data callable class: one APM per actor; each call handles a batch of work units."""

    def __init__(self, apm: str, out: str, max_tokens: int, threads: int, sources: list[str] | None) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AttributePredictionModel.from_pretrained(apm, SCHEMA)
        self.attributes = load_trained_attributes(apm, SCHEMA)
        self.model_id = _model_id(Path(apm))
        self.out, self.max_tokens, self.sources = Path(out), max_tokens, sources

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, seconds = [], []
        for text in batch["unit"]:
            started = time.perf_counter()
            unit = Unit.from_dict(json.loads(text))
            table, rejects = checked_unit(unit)
            if self.sources is not None:
                table = self._of_sources(table, unit)
            pred = predict(
                self.model,
                self.model.tokenizer,
                table.column("prompt").to_pylist(),
                table.column("response").to_pylist(),
                self.max_tokens,
                self.device,
            )  # (rows, n_attr)
            table = self._with_predictions(table, pred)
            # The unit's rejects first, then its part: a part on disk means the unit is done.
            rejected = self.out / REJECTS / part_name(unit.index).replace(".parquet", ".jsonl")
            rejected.parent.mkdir(exist_ok=True)
            tmp = rejected.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
            os.replace(tmp, rejected)
            path = self.out / part_name(unit.index)
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)  # atomic: a part exists whole or not at all
            rows.append(table.num_rows)
            seconds.append(time.perf_counter() - started)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "rows": np.array(rows),
            "seconds": np.array(seconds),
            "peak_rss_mb": np.full(len(rows), peak_mb),
        }

    def _of_sources(self, table: pa.Table, unit: Unit) -> pa.Table:
        """The unit's rows of `sources`; how many of each other source it held, written beside
        the part (before it: a part on disk means its unit is done)."""
        if SOURCE_COLUMN not in table.column_names:
            raise SourceError(
                f"{unit.shard.label}: relabel.sources is set but the rows have no {SOURCE_COLUMN!r} "
                "column (the filter stage writes it when `data` lists several sources)"
            )
        names = table.column(SOURCE_COLUMN).to_pylist()
        wanted = [name in set(self.sources or ()) for name in names]
        left_out = Counter(str(name) for name, keep in zip(names, wanted, strict=True) if not keep)
        path = self.out / OTHER_SOURCES / part_name(unit.index).replace(".parquet", ".json")
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"rows": sum(left_out.values()), "sources": dict(sorted(left_out.items()))})
        )
        os.replace(tmp, path)
        return table.filter(pa.array(wanted, pa.bool_()))

    def _with_predictions(self, table: pa.Table, pred: np.ndarray) -> pa.Table:
        rounded = round_clip(pred, SCHEMA)
        for name in self.attributes:
            j = SCHEMA.index(name)
            table = table.append_column(f"apm_{name}", pa.array(pred[:, j], pa.float32()))
            table = table.append_column(f"apm_{name}_int", pa.array(rounded[:, j], pa.int8()))
        table = table.append_column("apm_model", pa.array([self.model_id] * table.num_rows, pa.string()))
        return table.append_column("apm_schema", pa.array([SCHEMA.id] * table.num_rows, pa.string()))


def checked_unit(unit: Unit) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The unit's rows with a usable prompt and response (columns as the source has them), and a
    reject (input_file, input_line, field, reason, raw) for every other row, as the filter writes."""
    if unit.shard.kind in ("jsonl", "jsonl.gz"):  # checked before typing: 5 and "text" share no type
        located = read_unit_rows(unit)
        lines, rows = [line for line, _ in located], [row for _, row in located]
        table = None
    else:
        table = read_unit(unit)
        for name in TEXT_FIELDS:
            if name not in table.column_names:
                raise SourceError(f"{unit.shard.label}: no {name!r} column; columns: {table.column_names}")
        rows = table.select(list(TEXT_FIELDS)).to_pylist()
        lines = list(range(unit.start + 1, unit.stop + 1))  # 1-based row numbers in the file
    keep, rejects = [], []
    for line, row in zip(lines, rows, strict=True):
        try:
            check_texts(row)
            keep.append(True)
        except RowError as exc:
            keep.append(False)
            rejects.append(
                {
                    "input_file": unit.shard.path,
                    "input_line": line,
                    "field": exc.field,
                    "reason": exc.message,
                    "raw": json.dumps(row, ensure_ascii=False, default=str),
                }
            )
    if table is None:
        table = rows_table([row for row, ok in zip(rows, keep, strict=True) if ok])
        if table.num_rows == 0:
            table = pa.table({name: pa.array([], pa.string()) for name in TEXT_FIELDS})
        return table, rejects
    return table.filter(pa.array(keep, pa.bool_())), rejects


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _model_id(apm: Path) -> str:
    """The APM folder and a hash of all its weight files' bytes: which model labelled a row,
    exactly. Each file's digest is cached by size and mtime (helpsteer_core.fingerprints)."""
    digest = hashlib.sha256()
    for file in sorted(apm.glob("*.safetensors")):
        digest.update(f"{file.name}\0{file_digest(file, cached=True)}\n".encode())
    return f"{apm}@{digest.hexdigest()[:12]}"


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            raise OutputError(
                f"{out} holds a relabel of another input or model ({path}); "
                "use another `out`, or delete it to start over"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(
            f"{out} is not empty and is not a relabel output; nothing was deleted: use another `out`"
        )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    mark_output(out, "relabel")  # filled in place (resumable parts), so marked from the start


def run(config: RelabelConfig) -> dict[str, Any]:
    started = time.perf_counter()
    apm, out = resolve_path(config.apm), resolve_path(config.out)
    load_and_check_schema(apm, SCHEMA)  # a wrong or missing model fails before Ray starts
    local = resolve_path(config.data)
    source = str(local) if not config.data.startswith(HF_PREFIX) and local.exists() else config.data
    units = plan_units(resolve_source(source, config.hf_split), config.rows_per_unit)
    input_rows = sum(u.stop - u.start for u in units)
    manifest = {
        "apm": _model_id(apm),
        "data": source,
        "units": [u.to_dict() for u in units],
        "schema": SCHEMA.id,
    }
    if config.sources is not None:  # a run over other sources is other work, never continued
        manifest["sources"] = config.sources
    final, out = out, prepare_output(out, "relabel") if config.restart else out
    _check_manifest(out, manifest)
    pending = [u for u in units if not (out / part_name(u.index)).is_file()]
    log.info(
        "relabel: %d rows in %d units; %d already done; %d to do -> %s",
        input_rows,
        len(units),
        len(units) - len(pending),
        len(pending),
        out,
    )
    ensure_ray()
    quiet_ray_data()
    resolved = config.model_copy(update={"apm": str(apm), "data": source, "out": str(final)})
    (out / "config.yaml").write_text(dump_config(resolved))
    with stage_run("relabel", resolved, config.tracking, SCHEMA, {"apm": str(apm)}) as tracked:
        done: list[dict[str, Any]] = []
        if pending:
            results = ray.data.from_items(
                [{"unit": json.dumps(u.to_dict())} for u in pending], override_num_blocks=len(pending)
            ).map_batches(
                Relabeler,
                fn_constructor_kwargs={
                    "apm": str(apm),
                    "out": str(out),
                    "max_tokens": config.max_tokens,
                    "threads": config.cpus_per_actor,
                    "sources": config.sources,
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=config.actors),
                num_cpus=config.cpus_per_actor,
                num_gpus=config.gpus_per_actor,
            )
            progress = Progress(log, "relabel", len(pending), f"parts of {config.rows_per_unit} rows")
            for part in results.iter_rows():  # one row per part, as each is written
                done.append(part)
                progress.advance()
        output_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(out.glob("part-*.parquet")))
        rejected_rows = sum(
            len(p.read_text().splitlines()) for p in sorted((out / REJECTS).glob("part-*.jsonl"))
        )
        left_out: Counter[str] = Counter()
        for path in sorted((out / OTHER_SOURCES).glob("part-*.json")):
            left_out.update(json.loads(path.read_text())["sources"])
        elapsed = time.perf_counter() - started
        work_seconds = sum(r["seconds"] for r in done)
        relabelled = sum(int(r["rows"]) for r in done)
        stats = {
            "input_rows": input_rows,
            "output_rows": output_rows,
            "rejected_rows": rejected_rows,  # no usable prompt or response; reasons in rejects/
            "other_source_rows": sum(left_out.values()),  # left out by `sources`, per source below
            "other_sources": dict(sorted(left_out.items())),
            "reconciles": input_rows == output_rows + rejected_rows + sum(left_out.values()),
            "units": len(units),
            "units_skipped_as_done": len(units) - len(pending),
            "rows_relabelled_now": relabelled,
            "seconds": round(elapsed, 3),
            "rows_per_second": round(relabelled / elapsed, 2) if relabelled else 0.0,
            "actor_rows_per_second": round(relabelled / work_seconds, 2) if work_seconds else 0.0,
            "peak_rss_mb_per_actor": round(max((float(r["peak_rss_mb"]) for r in done), default=0.0), 1),
            "apm": manifest["apm"],
            "attribute_schema": SCHEMA.to_dict(),
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        SCHEMA.save(out)
        if out != final and stats["reconciles"]:
            out = publish(out, final, "relabel")
        tracked.log_metrics(stats)
        tracked.log_outputs({"stats.json": out / "stats.json", "out": out})
    if not stats["reconciles"]:
        raise RuntimeError(
            f"relabel: {input_rows} input rows but {output_rows} output, {rejected_rows} rejected and "
            f"{sum(left_out.values())} other-source rows in {out}"
        )
    if rejected_rows:
        log.warning("relabel: %d rows rejected, with reasons, in %s", rejected_rows, out / REJECTS)
    log.info(
        "relabel: %d rows in %.1fs (%.1f rows/s) -> %s", relabelled, elapsed, stats["rows_per_second"], out
    )
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.relabel", RelabelConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
