"""The relabel stage: predictions beside untouched input columns, unlabelled and multi-turn data,
and an interrupted run finished by a re-run with exactly one output row per input row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpsteer_core.attributes import HELPSTEER_ATTRIBUTES
from helpsteer_core.outputs import OutputError
from helpsteer_core.synthetic import write_synthetic
from ray_jobs.relabel import RelabelConfig, run

pytestmark = pytest.mark.slow
HELPSTEER = str(Path(sys.executable).parent / "helpsteer")


def _config(apm: Path, data: Path | str, out: Path, **kw: object) -> RelabelConfig:
    return RelabelConfig.model_validate(
        {
            "apm": str(apm),
            "data": str(data),
            "out": str(out),
            "tracking": {"runs_dir": str(out.parent / "runs")},
            **kw,
        }
    )


def _rows(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_predictions_are_added_and_human_labels_kept(trained_apm, tmp_path):
    source = trained_apm.data / "validation"
    stats = run(_config(trained_apm.model, source, tmp_path / "out", rows_per_unit=20))
    inputs = [r for f in sorted(source.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    outputs = _rows(tmp_path / "out")
    assert stats["input_rows"] == stats["output_rows"] == len(inputs) == len(outputs)
    assert stats["reconciles"] and stats["rows_per_second"] > 0
    for before, after in zip(inputs, outputs, strict=True):
        assert {k: after[k] for k in before} == before  # every input column untouched
        for name in HELPSTEER_ATTRIBUTES:
            assert isinstance(after[f"apm_{name}"], float)
            assert after[f"apm_{name}_int"] in range(5)
            assert after[f"apm_{name}_int"] == min(4, max(0, int(after[f"apm_{name}"] + 0.5)))
        assert "apm_quality" not in after  # never trained: not published
        assert after["apm_schema"] == "steerlm-v1" and after["apm_model"].startswith(str(trained_apm.model))


def test_unlabelled_and_multi_turn_rows(trained_apm, tmp_path):
    rows = [
        {"prompt": "Briefly, what is the capital of France?", "response": "Paris is the capital of France."},
        {
            "prompt": "Hi\n<extra_id_1>Assistant\nHello! How can I help?\n"
            "<extra_id_1>User\nIn one sentence, what is 2 + 3?",
            "response": "2 + 3 = 5.",
            "conversation_id": "c-7",
        },
    ]
    src = tmp_path / "unlabelled.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(_config(trained_apm.model, src, tmp_path / "out"))
    out = _rows(tmp_path / "out")
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]
    assert out[1]["conversation_id"] == "c-7"
    assert all(0 <= r["apm_verbosity_int"] <= 4 for r in out)


def _wait_until_no_other_jobs_actors_are_alive(dashboard: str, timeout: float = 120) -> None:
    import ray
    from ray.util.state import list_actors

    own_job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout
    while True:
        alive = [
            a
            for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True)
            if a.job_id != own_job and not a.is_detached
        ]
        if not alive:
            return
        assert time.monotonic() < deadline, f"the killed job's actors outlived it: {alive}"
        time.sleep(0.2)


def test_interrupted_run_is_finished_by_a_rerun_without_duplicates(ray_head, trained_apm, tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, rows=2000, seed=9)
    out = tmp_path / "out"
    args = [
        HELPSTEER,
        "relabel",
        "--apm",
        str(trained_apm.model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        "rows_per_unit=20",
        "--set",
        "actors=1",
        "--set",
        f"tracking.runs_dir={tmp_path / 'runs'}",
    ]
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    job = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        assert job.poll() is None, "the relabel finished before it could be interrupted"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver dies mid-run; Ray reclaims its actors
    job.wait()
    # A relabeller may finish the part it was writing before Ray kills it: count once none is left.
    _wait_until_no_other_jobs_actors_are_alive(ray_head.dashboard_url)
    written = len(list(out.glob("part-*.parquet")))
    assert 3 <= written < 100

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["units"] == 100 and stats["units_skipped_as_done"] == written
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == 2000 == len(set(ids)) == stats["output_rows"]
    assert not list(out.glob("*.tmp"))


def test_a_different_input_into_the_same_out_is_refused(trained_apm, tmp_path):
    run(_config(trained_apm.model, trained_apm.data / "validation", tmp_path / "out"))
    with pytest.raises(OutputError, match="another input or model"):
        run(_config(trained_apm.model, trained_apm.data / "train", tmp_path / "out"))


def test_rows_without_a_usable_prompt_or_response_become_rejects_with_reasons(trained_apm, tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "response": "It is 4.", "id": "good-1"},
        {"prompt": None, "response": "An answer to nothing.", "id": "null-prompt"},
        {"prompt": 5, "response": "Five.", "id": "int-prompt"},
        {"prompt": "Hi?", "response": "   ", "id": "blank-response"},
        {"prompt": "What is 3 + 3?", "response": "It is 6.", "id": "good-2"},
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    stats = run(_config(trained_apm.model, src, out, rows_per_unit=2))
    assert [r["id"] for r in _rows(out)] == ["good-1", "good-2"]
    assert (stats["input_rows"], stats["output_rows"], stats["rejected_rows"]) == (5, 2, 3)
    assert stats["reconciles"]
    rejects = [
        json.loads(line)
        for f in sorted((out / "rejects").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    got = {json.loads(r["raw"])["id"]: (r["input_file"], r["input_line"], r["field"]) for r in rejects}
    assert got == {
        "null-prompt": (str(src), 2, "prompt"),
        "int-prompt": (str(src), 3, "prompt"),
        "blank-response": (str(src), 4, "response"),
    }
    reasons = {json.loads(r["raw"])["id"]: r["reason"] for r in rejects}
    assert "missing" in reasons["null-prompt"] and "has type int" in reasons["int-prompt"]
    assert "is empty" in reasons["blank-response"]

    # A typed Parquet source: a null prompt in a string column is a reject too, types kept.
    table = pq.read_table(sorted((trained_apm.data / "validation").glob("*.parquet"))[0]).slice(0, 3)
    prompts = table.column("prompt").to_pylist()
    table = table.set_column(
        table.schema.get_field_index("prompt"),
        "prompt",
        pa.array([prompts[0], None, prompts[2]], pa.string()),
    )
    pq.write_table(table, tmp_path / "typed.parquet")
    stats = run(_config(trained_apm.model, tmp_path / "typed.parquet", tmp_path / "out2"))
    assert (stats["input_rows"], stats["output_rows"], stats["rejected_rows"]) == (3, 2, 1)
    [reject] = [
        json.loads(x) for x in (tmp_path / "out2" / "rejects" / "part-000000.jsonl").read_text().splitlines()
    ]
    assert (reject["input_line"], reject["field"]) == (2, "prompt")
    assert pq.read_table(tmp_path / "out2" / "part-000000.parquet").schema.field("prompt").type == pa.string()


def test_restart_re_predicts_every_part_and_publishes_them_whole(trained_apm, tmp_path):
    """restart=true (the pipeline's force): every part predicted again into a staging folder, not
    the parts on disk skipped; the finished output replaces the old one."""
    source, out = trained_apm.data / "validation", tmp_path / "out"
    first = run(_config(trained_apm.model, source, out, rows_per_unit=20))
    again = run(_config(trained_apm.model, source, out, rows_per_unit=20, restart=True))
    assert again["units_skipped_as_done"] == 0 and again["rows_relabelled_now"] == first["output_rows"]
    assert again["reconciles"] and len(_rows(out)) == first["output_rows"]
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / ".out.previous").exists()
