"""The filtering stage on a real local Ray cluster: synthetic data, a file of bad rows, the
HelpSteer2 sample, Parquet and Hugging Face sources, determinism, and its MLflow run."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shared_data import shared_file

from helpsteer_core.synthetic import write_synthetic
from ray_jobs.filter_data import FilterStageConfig, run
from ray_jobs.tracking import TrackingConfig, runs_for

pytestmark = pytest.mark.slow

GOOD = {
    "prompt": "What is 2 + 2?",
    "response": "It is 4.",
    "helpfulness": 4,
    "correctness": 4,
    "coherence": 4,
    "complexity": 0,
    "verbosity": 1,
}

# One line of every bad kind, each with the field the reject must name.
BAD_LINES = [
    ("not json at all", "line", "not valid JSON"),
    ("[1, 2, 3]", "line", "expected a JSON object"),
    (json.dumps({"response": "r"}), "prompt", "missing"),
    (json.dumps({"prompt": "p"}), "response", "missing"),
    (json.dumps({"prompt": 5, "response": "r"}), "prompt", "has type int"),
    (json.dumps({"prompt": "p", "response": "   "}), "response", "is empty"),
    (json.dumps({**GOOD, "helpfulness": 5}), "helpfulness", "outside the range"),
    (json.dumps({**GOOD, "verbosity": -1}), "verbosity", "outside the range"),
    (json.dumps({**GOOD, "coherence": 2.5}), "coherence", "not an integer"),
    (json.dumps({**GOOD, "complexity": "3"}), "complexity", "not a number"),
    (json.dumps({**GOOD, "correctness": True}), "correctness", "not a number"),
]


def _config(data: Path | str | list[dict], out: Path, runs: Path, **kw: object) -> FilterStageConfig:
    return FilterStageConfig.model_validate(
        {
            "data": data if isinstance(data, list) else str(data),
            "out": str(out),
            "tracking": {"runs_dir": str(runs)},
            **kw,
        }
    )


def _rows(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _read_stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def test_synthetic_source_counts_reconcile_and_split_is_prompt_grouped(ray_head, tmp_path):
    data = tmp_path / "synth"
    write_synthetic(data, rows=600, seed=3, shard_rows=250)
    out = tmp_path / "filtered"
    stats = run(_config(data, out, tmp_path / "runs", split={"validation_fraction": 0.2}))

    total = stats["total"]
    assert total["input_rows"] == 600
    assert total["input_rows"] == total["kept"] + total["filtered"] + total["rejected"]
    assert total["rejected"] == 0 and total["kept"] == 600  # synthetic pairs are unique
    assert len(stats["files"]) == 3 and all(f["reconciles"] for f in stats["files"].values())
    assert sum(f["input_rows"] for f in stats["files"].values()) == 600

    train, validation = _rows(out / "train"), _rows(out / "validation")
    assert len(train) == total["train"] and len(validation) == total["validation"]
    assert 0.1 < len(validation) / 600 < 0.3
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in validation}
    # Extra columns come through untouched, and only the attributes the data has are columns.
    assert {"id", "source", "input_file", "input_line"} <= set(train[0])
    assert "quality" not in train[0] and "verbosity" in train[0]
    ids = {r["id"] for r in train + validation}
    assert len(ids) == 600
    assert stats["attributes"] == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    for folder in ("train", "validation", "filtered", "rejects"):
        assert (out / folder).is_dir()


def test_bad_rows_land_in_rejects_with_reason_file_and_line(ray_head, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({**GOOD, "id": "good-1", "source": "unit"})]
    lines += [text for text, _, _ in BAD_LINES]
    lines += [json.dumps({**GOOD, "id": "good-2", "response": "Four."})]
    (src / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    stats = run(_config(src, out, tmp_path / "runs"))

    assert stats["total"]["input_rows"] == len(lines)
    assert stats["total"]["rejected"] == len(BAD_LINES)
    assert stats["total"]["kept"] == 2
    rejects = [json.loads(x) for x in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == len(BAD_LINES)
    by_line = {r["input_line"]: r for r in rejects}
    for line_no, (text, field, message) in enumerate(BAD_LINES, start=2):
        reject = by_line[line_no]
        assert reject["input_file"] == str(src / "mixed.jsonl")
        assert reject["field"] == field, reject
        assert message in reject["reason"], reject
        assert reject["raw"] == text
    kept = _rows(out / "train") + _rows(out / "validation")
    assert sorted(r["id"] for r in kept) == ["good-1", "good-2"]
    assert {r["source"] for r in kept} == {"unit", None}


def test_filters_count_what_they_remove(ray_head, tmp_path):
    rows = [
        {**GOOD, "response": "short"},  # kept
        {**GOOD, "response": "short"},  # duplicate of the first
        {**GOOD, "prompt": "Other?", "response": " ".join(["word"] * 50)},  # too long
        {"prompt": "No labels here?", "response": "none"},  # missing required attributes
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    stats = run(
        _config(
            src,
            out,
            tmp_path / "runs",
            filters={"max_response_tokens": 20, "required_attributes": ["helpfulness", "verbosity"]},
        )
    )
    assert stats["total"]["filtered_by"] == {
        "required_attributes": 1,
        "prompt_tokens": 0,
        "response_tokens": 1,
        "duplicate": 1,
    }
    filtered = {r["input_line"]: r for r in _rows(out / "filtered")}
    assert filtered[2]["filter"] == "duplicate"
    assert filtered[3]["filter"] == "response_tokens" and "> max_response_tokens=20" in filtered[3]["reason"]
    assert filtered[4]["filter"] == "required_attributes" and "helpfulness" in filtered[4]["reason"]


def test_helpsteer2_sample_has_zero_rejects_and_a_second_run_gives_the_same_rows(
    ray_head, tmp_path, helpsteer2_sample
):
    first = run(_config(helpsteer2_sample, tmp_path / "a", tmp_path / "runs"))
    second = run(_config(helpsteer2_sample, tmp_path / "b", tmp_path / "runs"))
    assert first["total"]["rejected"] == 0
    assert first["total"]["input_rows"] == 60 and first["total"]["kept"] == 60
    assert first["total"] == second["total"]
    for split in ("train", "validation"):
        assert _rows(tmp_path / "a" / split) == _rows(tmp_path / "b" / split)


def test_parquet_and_hub_format_sources(ray_head, tmp_path, monkeypatch):
    rows = [{**GOOD, "prompt": f"Question {i}?", "id": i} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    stats = run(_config(tmp_path / "rows.parquet", tmp_path / "out-pq", tmp_path / "runs"))
    assert stats["total"]["kept"] == 40
    kept = _rows(tmp_path / "out-pq" / "train") + _rows(tmp_path / "out-pq" / "validation")
    assert sorted(r["id"] for r in kept) == list(range(40))

    # A local folder laid out like a Hub dataset repo goes through datasets.load_dataset, the
    # same code path as hf:nvidia/HelpSteer2 for a user with internet access.
    hub = tmp_path / "HelpSteer2"
    hub.mkdir()
    with gzip.open(hub / "train.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows[:25])
    with gzip.open(hub / "validation.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows[25:])
    stats = run(_config(f"hf:{hub}", tmp_path / "out-hf", tmp_path / "runs", hf_split="validation"))
    assert stats["total"]["input_rows"] == 15
    assert list(stats["files"]) == [f"hf:{hub}[validation]"]


def test_missing_source_fails_before_ray_work_and_names_the_path(tmp_path):
    from helpsteer_core.readers import SourceError

    with pytest.raises(SourceError, match=str(tmp_path / "nope.jsonl")):
        run(_config(tmp_path / "nope.jsonl", tmp_path / "out", tmp_path / "runs"))
    assert not (tmp_path / "out").exists()


def test_stage_run_is_recorded_in_mlflow(ray_head, tmp_path):
    data = tmp_path / "synth"
    write_synthetic(data, rows=100, seed=5)
    runs = tmp_path / "runs"
    stats = run(_config(data, tmp_path / "out", runs))
    recorded = runs_for(TrackingConfig(runs_dir=str(runs)), "filter_data")
    assert len(recorded) == 1
    mlrun = recorded[0]
    assert mlrun.data.metrics["input_rows"] == 100 == stats["total"]["input_rows"]
    assert mlrun.data.params["data"] == str(data)
    assert mlrun.data.tags["attribute_schema"] == "steerlm-v1"
    # The machine its timings come from (docs/results.md compares runs across machines).
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert f"model name\t: {mlrun.data.tags['machine.cpu']}" in cpuinfo
    assert mlrun.data.tags["machine.cpus"] == str(len(os.sched_getaffinity(0)))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert mlrun.data.tags["machine.gpus"] == (", ".join(gpus) or "none")
    assert mlrun.info.status == "FINISHED"
    assert (runs / "mlflow.db").is_file()


class _DriverRows:
    """Counts the rows a Dataset hands to the driver process (take*, iter_rows, iter_batches,
    to_pandas), outermost calls only, so the test measures what the stage pulls, not Ray's
    internal layering."""

    METHODS = ("take_all", "take", "take_batch", "iter_rows", "iter_batches", "to_pandas")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ray.data

        self.rows = 0
        self._depth = 0
        for name in self.METHODS:
            original = getattr(ray.data.Dataset, name)
            monkeypatch.setattr(ray.data.Dataset, name, self._wrap(name, original))

    def _wrap(self, name: str, original):  # noqa: ANN202 - a test helper
        counter = self

        def counted(ds, *args, **kwargs):  # noqa: ANN001, ANN202
            counter._depth += 1
            try:
                result = original(ds, *args, **kwargs)
                if name.startswith("iter_"):
                    return counter._count_iter(result, name)
                if counter._depth == 1:
                    counter.rows += len(result) if name != "take_batch" else len(next(iter(result.values())))
                return result
            finally:
                counter._depth -= 1

        return counted

    def _count_iter(self, iterator, name: str):  # noqa: ANN001, ANN202
        outer = self._depth == 1
        for item in iterator:
            if outer:
                self.rows += 1 if name == "iter_rows" else len(item[next(iter(item))])
            yield item


def test_driver_holds_counts_not_rows(ray_head, tmp_path, monkeypatch):
    # 1,200 rows, one in six a duplicate, two bad lines: every count must reconcile while what
    # reaches the driver is the aggregate groups (file x status x filter x field x split), the
    # positions of the later copies of duplicates and the rejects streamed to their file: never a
    # row per input row (today's code pulled 2,400 for 1,200 rows).
    src = tmp_path / "in"
    src.mkdir()
    for part in range(2):
        lines = []
        for i in range(600):
            n = i - i % 2 if i % 6 == 1 else i  # every sixth row repeats the row before it
            lines.append(json.dumps({**GOOD, "prompt": f"Question {part}-{n}?", "response": f"Answer {n}."}))
        lines[10] = "not json at all"
        (src / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    pulled = _DriverRows(monkeypatch)
    stats = run(_config(src, tmp_path / "out", tmp_path / "runs", split={"validation_fraction": 0.2}))

    total = stats["total"]
    assert total["input_rows"] == 1200 and total["reconciles"]
    assert total["rejected"] == 2 and total["rejected_by_field"] == {"line": 2}
    assert total["filtered_by"]["duplicate"] == 200
    assert total["kept"] == 998 == total["train"] + total["validation"]
    for name, counts in stats["files"].items():
        assert counts["input_rows"] == 600 and counts["reconciles"], name
    kept = _rows(tmp_path / "out" / "train") + _rows(tmp_path / "out" / "validation")
    assert len(kept) == 998 and len({(r["prompt"], r["response"]) for r in kept}) == 998
    assert len(_rows(tmp_path / "out" / "filtered")) == 200
    groups_bound = 50
    assert pulled.rows <= total["rejected"] + total["filtered_by"]["duplicate"] + groups_bound, (
        f"{pulled.rows} rows reached the driver for 1,200 input rows"
    )


def _turn_rows_in_process(source: Path, **oasst: object) -> list[dict]:
    """What the stage should keep: the reader's units, flattened here without Ray."""
    from helpsteer_core.conversation_sources import ReadOptions, read_source, turn_rows

    read = read_source(str(source), ReadOptions(oasst=oasst))  # type: ignore[arg-type]
    return [row for unit in read.results if unit.status == "kept" for row in turn_rows(unit)]


OASST_LABELS = ("quality", "toxicity", "humor", "creativity")


def test_openassistant_trees_become_one_row_per_assistant_turn_alone_or_beside_other_sources(
    ray_head, tmp_path
):
    from test_oasst import FIXTURE, hub_rows, write_hub_folder

    from helpsteer_core.oasst import to_attribute_value

    fixture = shared_file(FIXTURE)
    trees = [json.loads(line) for line in fixture.read_text().splitlines() if line.strip()]
    broken = json.loads(json.dumps(trees[0]))
    broken["prompt"]["replies"][0]["role"] = "prompter"
    source = tmp_path / "oasst.trees.jsonl"
    source.write_text(fixture.read_text().rstrip("\n") + "\n" + json.dumps(broken) + "\n{oops\n")
    out = tmp_path / "filtered"
    settings = {"oasst": {"languages": ["en"]}, "split": {"validation_fraction": 0.3}}
    stats = run(_config(source, out, tmp_path / "runs", **settings))

    total = stats["total"]
    assert stats["input_format"] == "oasst-trees" and total["reconciles"]
    not_english = sum(1 for t in trees if t["prompt"]["lang"] != "en")
    assert not_english >= 1 and total["filtered_by"]["languages"] == not_english
    assert total["rejected"] == 2 and total["rejected_by_field"] == {"line": 1, "role": 1}
    rejects = [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    role = next(r for r in rejects if r["field"] == "role")
    assert role["input_line"] == len(trees) + 1 and "roles must alternate" in role["reason"]

    expected = _turn_rows_in_process(fixture, languages=["en"])
    train, validation = _rows(out / "train"), _rows(out / "validation")
    kept = train + validation
    assert len(expected) > len(trees) and total["kept"] == len(kept) == len(expected)
    assert {(r["prompt"], r["response"]) for r in kept} == {(r["prompt"], r["response"]) for r in expected}
    # Each row carries its own turn's labels, rounded as NeMo-Aligner rounds them.
    labels = {
        m["message_id"]: m.get("labels")
        for t in trees
        for m in _messages(t["prompt"])
        if m["role"] == "assistant"
    }
    for row in kept:
        for name in OASST_LABELS:
            raw = (labels[row["message_id"]] or {}).get(name)
            assert row[name] == (None if raw is None else to_attribute_value(raw["value"])), (row, name)
    multi_turn = [r for r in kept if r["turn"] > 1]
    assert multi_turn and all("<extra_id_1>Assistant\n" in r["prompt"] for r in multi_turn)
    # A conversation's turns stay in one split; both splits have some.
    assert train and validation
    assert not {r["conversation_id"] for r in train} & {r["conversation_id"] for r in validation}

    # The Hub's flat message table of the same trees gives the same rows.
    folder = write_hub_folder(tmp_path / "oasst1", hub_rows(fixture))
    flat_out = tmp_path / "filtered-flat"
    flat = run(_config(f"hf:{folder}", flat_out, tmp_path / "runs", **settings))
    assert flat["input_format"] == "oasst-messages" and flat["total"]["reconciles"]
    flat_kept = _rows(flat_out / "train") + _rows(flat_out / "validation")
    columns = ("prompt", "response", "conversation_id", "turn", "message_id", *OASST_LABELS)
    assert sorted(tuple(str(r[c]) for c in columns) for r in flat_kept) == sorted(
        tuple(str(r[c]) for c in columns) for r in kept
    )

    # Several sources in one run: each read with its own options, rows named by their source,
    # counted per source; the OpenAssistant rows are the ones it gives alone.
    synthetic = tmp_path / "synth"
    write_synthetic(synthetic, rows=120, seed=5, shard_rows=60)
    both_out = tmp_path / "filtered-both"
    sources = [
        {"name": "synthetic", "path": str(synthetic)},
        {"name": "oasst", "path": str(source), "oasst": {"languages": ["en"]}, "sft": "apm"},
    ]
    both = run(_config(sources, both_out, tmp_path / "runs", split={"validation_fraction": 0.3}))
    assert both["input_format"] == {"synthetic": "helpsteer", "oasst": "oasst-trees"}
    per_source = both["sources"]
    assert per_source["synthetic"]["input_rows"] == 120 and per_source["synthetic"]["kept"] == 120
    assert per_source["oasst"] == {k: v for k, v in total.items()}
    assert both["total"]["kept"] == 120 + total["kept"] and both["total"]["reconciles"]
    rows = _rows(both_out / "train") + _rows(both_out / "validation")
    by_source = {name: [r for r in rows if r["data_source"] == name] for name in ("synthetic", "oasst")}
    assert len(by_source["synthetic"]) == 120 and len(rows) == 120 + len(kept)
    assert sorted((r["prompt"], r["response"]) for r in by_source["oasst"]) == sorted(
        (r["prompt"], r["response"]) for r in kept
    )
    # Validation stays per source: each source has rows in it, named.
    assert {r["data_source"] for r in _rows(both_out / "validation")} == {"synthetic", "oasst"}
    with pytest.raises(ValueError, match="given more than once"):
        FilterStageConfig.model_validate({"data": [sources[0], sources[0]], "out": "o"})


def _messages(message: dict) -> list[dict]:
    return [message, *(m for reply in message.get("replies", []) for m in _messages(reply))]
