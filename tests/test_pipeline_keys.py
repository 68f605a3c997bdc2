"""The pipeline's cache keys (no Ray): a stage's output folder is keyed on the content of what it
reads and the settings that change its result, not on paths or settings that only change speed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpsteer_core.attributes import HELPSTEER_ATTRIBUTES
from helpsteer_core.config import load_config
from helpsteer_core.synthetic import write_synthetic
from ray_jobs.pipeline import STAGES, PipelineConfig, _Plan, variant_plan

REPO = Path(__file__).resolve().parents[1]
# SFT on the filter's rows (no `answers:`): the shape where relabel labels the training split.
BASE = ["data=null", "answers=null", "sft.attribute_source=prefer_human", "sft.repeat=[]"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    write_synthetic(folder, rows=40, seed=3)
    return folder


def _plan(runs: Path, data: Path, *overrides: str) -> _Plan:
    config = load_config(
        PipelineConfig, REPO / "configs" / "local.yaml", [f"runs_dir={runs}", *BASE, *overrides]
    )
    return _Plan(config, runs, str(data))


def _relabelled(plan: _Plan, apm_offset: float = 0.0) -> None:
    """A complete relabel output for `plan`: every row human-labelled, with APM predictions."""
    rows: list[dict[str, Any]] = []
    for i in range(6):
        row: dict[str, Any] = {"prompt": f"Question {i}?", "response": f"Answer {i}."}
        for j, name in enumerate(HELPSTEER_ATTRIBUTES):
            row[name] = (i + j) % 5
            row[f"apm_{name}"] = (i * j) % 5 + apm_offset
            row[f"apm_{name}_int"] = min(4, round((i * j) % 5 + apm_offset))
        rows.append(row)
    out = plan.out("relabel")
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "part-000000.parquet")
    plan.record("relabel").parent.mkdir(parents=True, exist_ok=True)
    plan.record("relabel").write_text("{}\n")


def _outs(plan: _Plan) -> dict[str, str]:
    return {stage: plan.out(stage).name for stage in STAGES if plan.used(stage)}


def test_settings_that_only_change_speed_change_no_key(tmp_path, data):
    runs = tmp_path / "runs"
    before = _plan(runs, data)
    _relabelled(before)
    after = _plan(
        runs,
        data,
        "filter.batch_size=7",
        "apm.checkpoint_every=3",
        "apm.eval_every=5",
        "apm.cpus_per_worker=2",
        "apm.keep_checkpoints=4",
        "apm.max_failures=0",
        "relabel.actors=5",
        "relabel.cpus_per_actor=3",
        "relabel.max_tokens=4096",
        "sft.checkpoint_every=7",
        "sft.eval_every=9",
        "sft.max_failures=5",
        "evaluate.actors=3",
        "evaluate.cpus_per_actor=1",
    )
    assert _outs(after) == _outs(before)
    # A setting that changes the result still changes its stage's key and those downstream.
    changed = _plan(runs, data, "sft.lr=1e-4")
    assert changed.out("train_sft") != before.out("train_sft")
    assert changed.out("evaluate") != before.out("evaluate")
    assert changed.out("relabel") == before.out("relabel")


def test_a_data_file_edited_in_place_changes_the_filter_key_and_everything_after_it(tmp_path, data):
    runs = tmp_path / "runs"
    before = _plan(runs, data)
    _relabelled(before)
    [shard] = sorted(data.glob("*.jsonl"))
    stat = shard.stat()
    text = shard.read_text()
    edited = text.replace("a", "e", 1)
    assert edited != text and len(edited) == len(text)
    shard.write_text(edited)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the bytes differ
    after = _plan(runs, data)
    for stage in ("filter", "train_apm", "relabel"):
        assert after.out(stage) != before.out(stage), stage
    assert after.complete("train_sft") is None and after.complete("evaluate") is None
    # The run summary names what changed.
    before.finish("filter", {})
    assert after.changed("filter") == ["data"]


def test_sft_key_follows_what_its_examples_are_built_from_not_the_apm(tmp_path, data):
    """prefer_human with every row human-labelled reads no APM column: a retrained APM (new
    relabel output with other predictions) reruns relabel and evaluate, not train_sft."""
    runs = tmp_path / "runs"
    first = _plan(runs, data)
    _relabelled(first)
    retrained = _plan(runs, data, "apm.lr=3.3e-4")
    _relabelled(retrained, apm_offset=0.3)
    assert retrained.out("relabel") != first.out("relabel")
    assert retrained.out("train_sft") == first.out("train_sft")
    assert retrained.out("evaluate") != first.out("evaluate")  # it measures with the APM

    # Conditioned on the APM's labels, the same change is a new SFT.
    apm_first = _plan(runs / "apm-labels", data, "sft.attribute_source=apm")
    _relabelled(apm_first)
    apm_retrained = _plan(runs / "apm-labels", data, "sft.attribute_source=apm", "apm.lr=3.3e-4")
    _relabelled(apm_retrained, apm_offset=0.6)
    assert apm_retrained.out("train_sft") != apm_first.out("train_sft")


def test_inputs_are_recorded_beside_the_stage_record(tmp_path, data):
    plan = _plan(tmp_path / "runs", data)
    plan.finish("filter", {"total": {}})
    inputs = json.loads(plan.record("filter").with_suffix(".inputs.json").read_text())
    assert set(inputs) == {"data", "settings", "code"}
    assert inputs["data"].startswith("sha256:") and "batch_size" not in inputs["settings"]


def test_a_variant_shares_every_key_before_train_sft_whatever_its_sft_changes(tmp_path, data):
    """A variant shares every stage before train_sft with the main run (its docstring's promise),
    also when its sft section changes what the untuned generator's answers were keyed on (the
    examples' condition_on, the generator): it trains on the main run's relabelled answers."""
    runs = tmp_path / "runs"
    ablation = (
        "variants=[{name: no-verbosity, sft: {examples: "
        "{condition_on: [helpfulness, correctness, coherence, complexity]}}}]"
    )
    # The profile's answers on: the answers' key reads the sft section's examples.
    config = load_config(
        PipelineConfig, REPO / "configs" / "local.yaml", [f"runs_dir={runs}", "data=null", ablation]
    )
    main = _Plan(config, runs, str(data))
    variant, own = variant_plan(config, 0, main)
    assert variant.sft.examples.condition_on == ["helpfulness", "correctness", "coherence", "complexity"]
    for stage in ("filter", "train_apm", "generate_answers", "relabel"):
        assert own.out(stage) == main.out(stage), stage


def test_the_levels_said_in_words_rekey_train_sft_but_not_the_untuned_generators_answers(tmp_path, data):
    """The untuned generator answers with no attribute line, so `sft.examples.level_words` never
    reaches its prompts: the answers (and relabel) keep their keys; train_sft's changes."""
    runs = tmp_path / "runs"

    def plan(*overrides: str) -> _Plan:
        config = load_config(
            PipelineConfig, REPO / "configs" / "local.yaml", [f"runs_dir={runs}", "data=null", *overrides]
        )
        return _Plan(config, runs, str(data))

    # (rows without generate_answers' columns: no per-answer levels, no repeats)
    rows = ("sft.answer_level=[]", "sft.repeat=[]")
    worded, digits = plan(*rows), plan(*rows, "sft.examples.level_words=null")
    assert worded.config.sft.examples.level_words and digits.config.sft.examples.level_words is None
    for stage in ("filter", "train_apm", "generate_answers", "relabel"):
        assert worded.out(stage) == digits.out(stage), stage
    _relabelled(worded)
    assert worded.out("train_sft") != digits.out("train_sft")
