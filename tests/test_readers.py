"""Data sources: which shards a source resolves to, errors that name the path, and rows that keep
their true file and line, including when a line or the file itself is broken."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpsteer_core import readers
from helpsteer_core.readers import FILE_SUFFIXES, Shard, SourceError, iter_raw_rows, resolve_source

ROWS = [{"prompt": f"prompt {i}", "response": f"response {i}", "helpfulness": i % 5} for i in range(6)]
RAW_KEYS = {"input_file", "input_line", "input_order", "raw", "read_error"}


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonl_text(rows))
    return path


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(jsonl_text(rows).encode()))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_all(source: str, split: str = "train") -> list[dict]:
    return [row for shard in resolve_source(source, split) for row in iter_raw_rows(shard)]


# --- resolve_source: files and folders ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "writer", "kind"),
    [
        ("rows.jsonl", write_jsonl, "jsonl"),
        ("rows.jsonl.gz", write_jsonl_gz, "jsonl.gz"),
        ("rows.parquet", write_parquet, "parquet"),
        ("ROWS.JSONL", write_jsonl, "jsonl"),
    ],
)
def test_single_file_is_one_shard_and_reads_every_row(tmp_path: Path, name, writer, kind) -> None:
    path = writer(tmp_path / name, ROWS)
    shards = resolve_source(str(path))
    assert shards == [Shard(kind, str(path.resolve()), 0)]
    rows = list(iter_raw_rows(shards[0]))
    assert [json.loads(r["raw"]) for r in rows] == ROWS
    assert [r["input_line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {r["input_file"] for r in rows} == {str(path.resolve())}
    assert all(r["read_error"] == "" and set(r) == RAW_KEYS for r in rows)


def test_relative_file_resolves_to_absolute_path(tmp_path: Path, monkeypatch) -> None:
    write_jsonl(tmp_path / "d" / "rows.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    (shard,) = resolve_source("d/rows.jsonl")
    assert shard.path == str(tmp_path.resolve() / "d" / "rows.jsonl")


def test_folder_of_mixed_files_in_sorted_order(tmp_path: Path) -> None:
    write_parquet(tmp_path / "c.parquet", ROWS[4:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    write_jsonl_gz(tmp_path / "b.jsonl.gz", ROWS[2:4])
    write_jsonl(tmp_path / "z" / "d.jsonl", [ROWS[0]])
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "README.md").write_text("not data\n")
    shards = resolve_source(str(tmp_path))
    assert [(Path(s.path).relative_to(tmp_path.resolve()).as_posix(), s.kind) for s in shards] == [
        ("a.jsonl", "jsonl"),
        ("b.jsonl.gz", "jsonl.gz"),
        ("c.parquet", "parquet"),
        ("z/d.jsonl", "jsonl"),
    ]
    assert [s.order for s in shards] == [0, 1, 2, 3]
    rows = [row for shard in shards for row in iter_raw_rows(shard)]
    assert [json.loads(r["raw"]) for r in rows] == ROWS + [ROWS[0]]
    assert [r["input_order"] for r in rows] == [0, 0, 1, 1, 2, 2, 3]


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "rows.jsonl"
    with pytest.raises(SourceError) as err:
        resolve_source(str(missing))
    assert f"data source not found: {missing}" in str(err.value)
    assert "hf:DATASET_ID" in str(err.value)


def test_a_mistyped_two_part_local_path_is_not_taken_for_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data" / "synth").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as err:
        resolve_source("data/synht")  # `data/` is a local folder: a typo, not the Hub dataset data/synht
    assert str(err.value).startswith("data source not found: data/synht ")
    assert "cannot load split" not in str(err.value)  # no Hub download was attempted


def test_a_two_part_name_with_no_local_folder_is_still_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no `nvidia/` here: nvidia/HelpSteer2 means the Hub dataset
    with pytest.raises(SourceError, match=r"^hf:nvidia/HelpSteer2: cannot load split 'train'"):
        resolve_source("nvidia/HelpSteer2")  # offline in tests (HF_DATASETS_OFFLINE): the Hub was asked


def test_unsupported_suffix_lists_allowed_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("prompt,response\n")
    with pytest.raises(SourceError) as err:
        resolve_source(str(path))
    assert str(err.value) == f"{path}: unsupported file type; allowed: .jsonl, .jsonl.gz, .parquet"
    assert FILE_SUFFIXES == (".jsonl", ".jsonl.gz", ".parquet")


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "only.csv").write_text("x\n")
    with pytest.raises(SourceError) as err:
        resolve_source(str(tmp_path))
    assert str(err.value) == f"{tmp_path}: folder holds no data files; allowed: .jsonl, .jsonl.gz, .parquet"


@pytest.mark.parametrize(("name", "kind"), [("bad.parquet", "parquet"), ("bad.jsonl.gz", "jsonl.gz")])
def test_unreadable_file_fails_at_resolve_with_path_and_kind(tmp_path: Path, name, kind) -> None:
    path = tmp_path / name
    path.write_text('{"prompt": "not really this format"}\n')
    with pytest.raises(SourceError, match=f"cannot be read as {kind}") as err:
        resolve_source(str(path))
    assert str(err.value).startswith(f"{path}: ")


def test_shard_dict_round_trip() -> None:
    shard = Shard("hf", "owner/name", 3, "train", 10, 20)
    assert Shard(**shard.to_dict()) == shard
    assert shard.label == "hf:owner/name[train]"
    assert Shard("jsonl", "/d/x.jsonl", 0).label == "/d/x.jsonl"


# --- iter_raw_rows: lines and broken input ---------------------------------------------------------


def test_blank_lines_are_skipped_but_line_numbers_stay_true(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), "", json.dumps(ROWS[2])]
    path.write_text("\n".join(lines) + "\n\n")
    rows = read_all(str(path))
    assert [r["input_line"] for r in rows] == [1, 4, 6]
    assert [json.loads(r["raw"]) for r in rows] == ROWS[:3]


def test_crlf_line_endings_are_not_part_of_the_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"b": 2}\r\n')
    assert [r["raw"] for r in read_all(str(path))] == ['{"a": 1}', '{"b": 2}']


def test_bad_utf8_line_is_one_row_with_read_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        json.dumps(ROWS[0]).encode()
        + b"\n"
        + b'{"prompt": "caf\xe9"}\n'
        + json.dumps(ROWS[1]).encode()
        + b"\n"
    )
    rows = read_all(str(path))
    assert [r["input_line"] for r in rows] == [1, 2, 3]
    assert [r["read_error"] != "" for r in rows] == [False, True, False]
    assert rows[1]["read_error"].startswith("line is not UTF-8:")
    assert "caf" in rows[1]["raw"]
    assert json.loads(rows[2]["raw"]) == ROWS[1]


def _big_rows(n: int) -> list[dict]:
    # Text that does not compress away, so a cut file still holds whole lines.
    return [
        {"prompt": f"p{i} " + " ".join(str(i * 7919 + j * 104729) for j in range(40)), "response": "r"}
        for i in range(n)
    ]


def test_truncated_gzip_yields_good_rows_then_one_error_row(tmp_path: Path) -> None:
    rows_in = _big_rows(200)
    data = gzip.compress(jsonl_text(rows_in).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rows = read_all(str(path))
    good, last = rows[:-1], rows[-1]
    assert 10 < len(good) < 200
    assert [json.loads(r["raw"]) for r in good] == rows_in[: len(good)]
    assert [r["input_line"] for r in good] == list(range(1, len(good) + 1))
    assert all(r["read_error"] == "" for r in good)
    assert last["input_line"] == len(good) + 1
    assert last["raw"] == ""
    assert last["read_error"].startswith(f"file read failed after line {len(good)}:")


def test_gzip_missing_only_its_trailer_yields_every_row_then_an_error(tmp_path: Path) -> None:
    data = gzip.compress(jsonl_text(ROWS).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[:-4])
    rows = read_all(str(path))
    assert [json.loads(r["raw"]) for r in rows[:-1]] == ROWS
    assert rows[-1]["input_line"] == 7
    assert "file read failed after line 6" in rows[-1]["read_error"]


def test_corrupt_gzip_midway_ends_with_an_error_row(tmp_path: Path) -> None:
    # Two gzip members (gzip.open reads both); the second's deflate block type is invalid.
    good = gzip.compress(jsonl_text(ROWS[:2]).encode())
    bad = bytearray(gzip.compress(jsonl_text(ROWS[2:]).encode()))
    bad[10] = 0xFF  # first byte after the 10-byte header: BTYPE=11, a reserved block type
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(good + bytes(bad))
    rows = read_all(str(path))
    assert [json.loads(r["raw"]) for r in rows[:2]] == ROWS[:2]
    assert rows[2]["input_line"] == 3
    assert rows[2]["read_error"].startswith("file read failed after line 2:")
    assert len(rows) == 3


def test_unknown_shard_kind_is_an_error() -> None:
    with pytest.raises(SourceError, match="unknown shard kind 'csv'"):
        list(iter_raw_rows(Shard("csv", "/x.csv", 0)))


def test_parquet_values_json_has_no_type_for_are_kept_as_text(tmp_path: Path) -> None:
    import datetime

    when = datetime.datetime(2024, 5, 1, 12, 30)
    path = write_parquet(tmp_path / "t.parquet", [{"prompt": "p", "response": "r", "at": when}])
    (row,) = read_all(str(path))
    assert json.loads(row["raw"]) == {"prompt": "p", "response": "r", "at": str(when)}


def test_helpsteer2_sample_reads_60_rows(helpsteer2_sample: Path) -> None:
    rows = read_all(str(helpsteer2_sample))
    assert len(rows) == 60
    assert [r["input_line"] for r in rows] == list(range(1, 61))
    assert all(r["read_error"] == "" for r in rows)
    assert [r["raw"] for r in rows] == helpsteer2_sample.read_text().splitlines()


# --- Hugging Face datasets (local, offline) ----------------------------------------------------------


@pytest.fixture
def offline_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """datasets with no network and its cache inside tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # datasets reads these at import time; set them too in case it was imported earlier.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


@pytest.mark.parametrize("layout", ["data/train.jsonl.gz", "data/train.jsonl", "train.jsonl"])
def test_hf_local_repo_folder(offline_hf, tmp_path: Path, layout: str) -> None:
    repo = tmp_path / "HelpSteer2"
    writer = write_jsonl_gz if layout.endswith(".gz") else write_jsonl
    writer(repo / layout, ROWS)
    writer(repo / layout.replace("train", "validation"), ROWS[:2])
    shards = resolve_source(f"hf:{repo}")
    assert shards == [Shard("hf", str(repo), 0, "train", 0, 6)]
    rows = [r for s in shards for r in iter_raw_rows(s)]
    assert [json.loads(r["raw"]) for r in rows] == ROWS
    assert {r["input_file"] for r in rows} == {f"hf:{repo}[train]"}
    assert [r["input_line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert len(read_all(f"hf:{repo}", split="validation")) == 2


def test_hf_rows_are_cut_into_range_shards_with_true_lines(
    offline_hf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "HF_ROWS_PER_SHARD", 4)
    repo = tmp_path / "repo"
    write_jsonl(repo / "data" / "train.jsonl", ROWS)
    shards = resolve_source(f"hf:{repo}")
    assert [(s.order, s.start, s.stop) for s in shards] == [(0, 0, 4), (1, 4, 6)]
    rows = [r for s in shards for r in iter_raw_rows(s)]
    assert [r["input_line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["input_order"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert [json.loads(r["raw"]) for r in rows] == ROWS


def test_hf_missing_split_names_source_and_split(offline_hf, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_jsonl(repo / "data" / "train.jsonl", ROWS)
    with pytest.raises(SourceError, match=f"hf:{repo}: cannot load split 'test'"):
        resolve_source(f"hf:{repo}", split="test")


def test_save_to_disk_dataset_folder(offline_hf, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    offline_hf.Dataset.from_list(ROWS).save_to_disk(str(folder))
    shards = resolve_source(str(folder))
    assert shards == [Shard("hf-disk", str(folder.resolve()), 0, "train", 0, 6)]
    rows = read_all(str(folder))
    assert [json.loads(r["raw"]) for r in rows] == ROWS
    assert {r["input_file"] for r in rows} == {f"hf:{folder.resolve()}[train]"}
    assert [r["input_line"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_save_to_disk_dataset_dict_picks_the_split(offline_hf, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    offline_hf.DatasetDict(
        {"train": offline_hf.Dataset.from_list(ROWS), "test": offline_hf.Dataset.from_list(ROWS[:2])}
    ).save_to_disk(str(folder))
    assert [json.loads(r["raw"]) for r in read_all(str(folder), split="test")] == ROWS[:2]
    with pytest.raises(SourceError, match=r"no split 'dev'; splits: train, test"):
        resolve_source(str(folder), split="dev")


def test_empty_hf_split_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_load_hf", lambda path, split: [])
    with pytest.raises(SourceError, match=r"^owner/empty: split 'train' has no rows$"):
        resolve_source("hf:owner/empty")


def test_damaged_save_to_disk_folder_names_the_folder(offline_hf, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    offline_hf.Dataset.from_list(ROWS).save_to_disk(str(folder))
    (folder / "state.json").write_text("not json")
    with pytest.raises(SourceError, match=str(folder)):
        resolve_source(str(folder))
