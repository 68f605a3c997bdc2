"""`helpsteer export` as a user runs it: with no other flags, its files are NeMo-Aligner's own
output for the shared rows (`cmp`), from JSON Lines, OpenAssistant trees, our Parquet folders and
NeMo's files themselves; rejects are written with reasons; an existing file is never overwritten
unasked; the Ray Data path writes parts whose concatenation is the single file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import shared_file

HELPSTEER = str(Path(sys.executable).parent / "helpsteer")
HELPSTEER2 = "helpsteer2/train_rows_001_060.jsonl"
OASST = "oasst/fixture_a.trees.jsonl"
GOLDEN = {
    (HELPSTEER2, "nemo-acsft"): "nemo_aligner/helpsteer2_rows_001_060.acsft.jsonl",
    (HELPSTEER2, "nemo-regression"): "nemo_aligner/helpsteer2_rows_001_060.regression.jsonl",
    (OASST, "nemo-acsft"): "nemo_aligner/oasst_fixture_a.acsft.jsonl",
    (OASST, "nemo-regression"): "nemo_aligner/oasst_fixture_a.regression.jsonl",
}


def export(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HELPSTEER, "export", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def same_bytes(a: Path, b: Path) -> bool:
    """What `cmp` says (exit status 0: identical)."""
    return subprocess.run(["cmp", str(a), str(b)], capture_output=True).returncode == 0


@pytest.mark.parametrize(("source", "fmt"), list(GOLDEN))
def test_export_with_no_flags_is_nemo_aligners_output(source: str, fmt: str, tmp_path: Path) -> None:
    done = export("--format", fmt, "--data", str(shared_file(source)), "--out", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_bytes(tmp_path / "out.jsonl", shared_file(GOLDEN[(source, fmt)]))
    assert "0 rejected" in done.stdout and not (tmp_path / "out.jsonl.rejects.jsonl").exists()


@pytest.mark.parametrize("golden", sorted(set(GOLDEN.values())))
def test_exporting_nemo_files_gives_them_back(golden: str, tmp_path: Path) -> None:
    fmt = "nemo-acsft" if golden.endswith(".acsft.jsonl") else "nemo-regression"
    done = export("--format", fmt, "--data", str(shared_file(golden)), "--out", "back.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_bytes(tmp_path / "back.jsonl", shared_file(golden))


def test_our_parquet_folders_export_the_same_as_their_rows(tmp_path: Path) -> None:
    """A filter-stage-like folder (prompt, response, attributes, provenance) and a relabel-like one
    whose APM labels are exported with --attribute-source apm."""
    rows = [json.loads(line) for line in shared_file(HELPSTEER2).read_text(encoding="utf-8").splitlines()]
    for i, row in enumerate(rows):
        row.update(input_file="x.jsonl", input_line=i + 1)
    folder = tmp_path / "filtered" / "train"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:25]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[25:]), folder / "part-1.parquet")
    done = export("--format", "nemo-acsft", "--data", str(folder), "--out", "train.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_bytes(tmp_path / "train.jsonl", shared_file(GOLDEN[(HELPSTEER2, "nemo-acsft")]))

    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    attrs = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    apm_rows = [{**row, **{f"apm_{a}_int": (row[a] + 1) % 5 for a in attrs}} for row in rows[:4]]
    pq.write_table(pa.Table.from_pylist(apm_rows), relabelled / "part-000000.parquet")
    apm_args = ("--data", str(relabelled), "--out", "apm.jsonl", "--attribute-source", "apm")
    done = export("--format", "nemo-acsft", *apm_args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    labels = [json.loads(line)["conversations"][1]["label"] for line in (tmp_path / "apm.jsonl").open()]
    assert labels == [",".join(f"{a}:{(row[a] + 1) % 5}" for a in attrs) for row in rows[:4]]


def test_rejects_are_written_with_reasons_and_an_existing_file_is_kept(tmp_path: Path) -> None:
    trees = shared_file(OASST).read_text(encoding="utf-8").splitlines()
    bad = json.loads(trees[0])
    bad["prompt"]["replies"][0]["labels"]["humor"]["value"] = -0.5
    source = tmp_path / "mixed.trees.jsonl"
    source.write_text("\n".join([trees[1], json.dumps(bad), "not json"]) + "\n")
    done = export("--format", "nemo-regression", "--data", str(source), "--out", "r.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 kept" in done.stdout and "2 rejected" in done.stdout
    rejects = [json.loads(line) for line in (tmp_path / "r.jsonl.rejects.jsonl").open()]
    assert [(r["input_line"], r["field"]) for r in rejects] == [(2, "labels.humor"), (3, "line")]
    assert rejects[0]["input_file"] == str(source) and "allowed: a number in 0..1" in rejects[0]["reason"]
    assert (tmp_path / "r.jsonl").read_text().count("\n") >= 1

    before = (tmp_path / "r.jsonl").read_bytes()
    again = export("--format", "nemo-acsft", "--data", str(source), "--out", "r.jsonl", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (tmp_path / "r.jsonl").read_bytes() == before

    unknown = tmp_path / "odd.jsonl"
    unknown.write_text('{"question": "?"}\n')
    odd = export("--format", "nemo-acsft", "--data", str(unknown), "--out", "o.jsonl", cwd=tmp_path)
    assert (
        odd.returncode == 2 and "cannot tell the format" in odd.stderr and not (tmp_path / "o.jsonl").exists()
    )


@pytest.mark.slow
def test_ray_data_export_writes_parts_that_concatenate_to_the_single_file(ray_head, tmp_path: Path) -> None:
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    lines = shared_file(HELPSTEER2).read_text(encoding="utf-8").splitlines(keepends=True)
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(lines[:20]), encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(lines[20:]) + '{"prompt": 5}\n', encoding="utf-8")
    done = export(
        "--format", "nemo-regression", "--data", "rows", "--out", "parts", "--ray", cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "parts"
    parts = sorted(out.glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-00000.jsonl", "part-00001.jsonl"]
    joined = b"".join(p.read_bytes() for p in parts)
    assert joined == shared_file(GOLDEN[(HELPSTEER2, "nemo-regression")]).read_bytes()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["units"] == stats["source_rows"] == 61 and stats["kept"] == 60 and stats["rejected"] == 1
    assert stats["reconciles"]
    (reject,) = [json.loads(line) for line in (out / "rejects" / "part-00001.jsonl").open()]
    assert reject["field"] == "prompt" and reject["input_line"] == 41

    trees = export(
        "--format",
        "nemo-acsft",
        "--data",
        str(shared_file(OASST)),
        "--out",
        "t",
        "--ray",
        cwd=tmp_path,
        env=env,
    )
    assert trees.returncode == 0, trees.stderr[-3000:]
    assert same_bytes(tmp_path / "t" / "part-00000.jsonl", shared_file(GOLDEN[(OASST, "nemo-acsft")]))


def test_ray_path_gives_a_message_table_whole_hub_splits() -> None:
    from helpsteer_core.readers import Shard
    from ray_jobs.export_data import whole_splits

    ranges = [Shard("hf", "/d/oasst1", i, "train", i * 10, i * 10 + 10) for i in range(3)]
    files = [Shard("parquet", "/d/a.parquet", 3), Shard("hf", "/d/oasst1", 4, "validation", 0, 10)]
    assert whole_splits(ranges + files) == [
        Shard("hf", "/d/oasst1", 0, "train", 0, 30),
        Shard("parquet", "/d/a.parquet", 1),
        Shard("hf", "/d/oasst1", 2, "validation", 0, 10),
    ]


def test_openassistant_flags_reach_the_reader(tmp_path: Path) -> None:
    from helpsteer_core.conversation_sources import ReadOptions, read_source
    from helpsteer_core.nemo_format import acsft_line

    source = shared_file(OASST)
    flags = [
        "--language",
        "en",
        "--tree-state",
        "ready_for_export",
        "--drop-deleted",
        "--min-label-count",
        "2",
    ]
    done = export("--format", "nemo-acsft", "--data", str(source), "--out", "o.jsonl", *flags, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    options = {
        "languages": ["en"],
        "tree_states": ["ready_for_export"],
        "drop_deleted": True,
        "min_label_count": 2,
    }
    expected = read_source(str(source), ReadOptions.model_validate({"oasst": options}))
    everything = read_source(str(source))
    assert len(expected.conversations) < len(everything.conversations)
    lines = (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [acsft_line(c) for c in expected.conversations]
    assert "filtered" in done.stdout and "'tree_states'" in done.stdout
