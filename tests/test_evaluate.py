"""The evaluation stage on a local Ray cluster with tiny models: every sweep request answered by
both models on Ray Data, measured, reported (report.md, metrics.json, plots, MLflow), and
MT-Bench answers in FastChat's format, real-style prompts answered in the same pass and scored for
relevance; bad input fails before any generation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import model_loads_here

from helpsteer_core.apm import APMConfig, AttributePredictionModel
from helpsteer_core.attributes import STEERLM, AttributeValueError
from helpsteer_core.config import dump_config
from helpsteer_core.conversation import parse_prompt_turns
from helpsteer_core.prompt_files import real_prompts
from ray_jobs.evaluate import EvaluateConfig, run
from ray_jobs.tracking import TrackingConfig, runs_for
from ray_jobs.train_sft import TrainSFTConfig

pytestmark = pytest.mark.slow
HELPSTEER = str(Path(sys.executable).parent / "helpsteer")
MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench" / "question.jsonl"
HELPSTEER2 = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "helpsteer2" / "train_rows_001_060.jsonl"
)


def _real_prompt_files(tmp_path: Path) -> list[str]:
    """HelpSteer2 rows and MT-Bench questions from ../shared; stand-ins of both formats without it."""
    if HELPSTEER2.is_file() and MT_BENCH.is_file():
        return [str(HELPSTEER2), str(MT_BENCH)]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is rain?", "Name a river."]) + "\n")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "turns": ["Why is the sky blue?", "Shorter."]}) + "\n")
    return [str(rows), str(questions)]


@pytest.fixture(scope="module")
def models(tiny_generator, tiny_backbone, tmp_path_factory) -> tuple[Path, Path]:
    """A generator folder laid out as train_sft writes it (weights untouched: the stage's
    mechanics, not its quality, are under test) and an APM folder on the tiny backbone."""
    root = tmp_path_factory.mktemp("evaluate-models")
    generator = root / "sft"
    shutil.copytree(tiny_generator, generator)
    sft = TrainSFTConfig.model_validate(
        {
            "data": "unused",
            "out": str(generator),
            "generator": str(tiny_generator),
            "examples": {"template": "chat", "max_length": 256},
        }
    )
    (generator / "sft_config.yaml").write_text(dump_config(sft))
    STEERLM.save(generator)
    apm = root / "apm"
    AttributePredictionModel.from_backbone(APMConfig(backbone=str(tiny_backbone))).save_pretrained(apm)
    (apm / "trained_attributes.json").write_text(json.dumps(["verbosity", "complexity"]))
    return generator, apm


def _config(models: tuple[Path, Path], data: Path, out: Path, **extra) -> EvaluateConfig:
    generator, apm = models
    values = {
        "generator": str(generator),
        "apm": str(apm),
        "data": str(data / "validation"),
        "out": str(out / "eval"),
        "prompts": 2,
        "attribute_prompts": {"verbosity": 3},
        "attributes": ["verbosity", "complexity"],
        "max_new_tokens": 6,
        "batch_size": 8,
        "tracking": {"runs_dir": str(out / "runs")},
    }
    return EvaluateConfig.model_validate(values | extra)


def test_sweeps_are_answered_measured_and_reported_against_the_baseline(
    ray_head, models, synthetic_filtered, tmp_path
):
    extra = {}
    if MT_BENCH.is_file():
        # The demo's subset: the first question of each of FastChat's eight categories.
        extra = {"mt_bench": str(MT_BENCH), "mt_bench_per_category": 1, "mt_bench_max_new_tokens": 4}
    extra |= {
        "real_prompts": _real_prompt_files(tmp_path),
        "real_relevance_prompts": 3,
        "real_attribute_prompts": {"verbosity": 2},
    }
    with model_loads_here() as loads:
        result = run(_config(models, synthetic_filtered, tmp_path, **extra))
    # Both generators answered in actors, the APM and the relevance encoder scored in a task.
    assert loads == []
    out = tmp_path / "eval"
    everything = pq.read_table(out / "responses.parquet").to_pylist()
    rows = [r for r in everything if r["prompt_set"] == "synthetic"]
    assert len(rows) == 2 * (3 + 2) * 5  # models x (verbosity's 3 prompts + complexity's 2) x levels
    for row in rows:
        attributes = json.loads(row["attributes"])
        assert attributes[row["attribute"]] == row["level"]
        assert row["new_tokens"] <= 6 and row["words"] >= 0
        assert {"apm_verbosity", "apm_complexity"} <= set(row) and "apm_coherence" not in row
    assert {r["model"] for r in rows} == {"tuned", "baseline"}
    report = (out / "report.md").read_text()
    for line in ("| verbosity | words |", "| verbosity | apm_verbosity |", "| complexity | fk_grade |"):
        assert line in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"tuned", "baseline"}
    figure = metrics["results"]["tuned"]["verbosity"][0]
    assert figure["prompts"] == 3 and -1 <= figure["within_prompt"] <= 1
    assert metrics["results"]["tuned"]["complexity"][0]["prompts"] == 2
    assert sorted(p.name for p in out.glob("*.png")) == [
        "steer_complexity.png",
        "steer_real_verbosity.png",
        "steer_verbosity.png",
    ]
    assert set(result["steerability"]["tuned"]["verbosity"]) == {"words", "apm_verbosity"}

    # Real prompts: per model, verbosity's 2 prompts x 5 levels, plus 3 prompts at the defaults.
    real = [r for r in everything if r["prompt_set"] == "real"]
    assert len(real) == 2 * (2 * 5 + 3) and {r["prompt_id"] for r in real} == {0, 1, 2}
    assert {r["attribute"] for r in real} == {"verbosity", None}
    defaults = [r for r in real if r["attribute"] is None]
    assert all(-1 <= r["relevance"] <= 1 and "apm_verbosity" in r for r in defaults)
    relevance = result["relevance"]
    for name in ("tuned", "baseline"):
        summary = relevance[name]
        assert summary["prompts"] == summary["answers"] == 3  # the default answers of prompts 0..2
        assert -1 <= summary["mean_cosine"] <= 1 and summary["median_words"] >= 0
        assert 0 <= summary["ended_on_own"] <= 3
    # The baseline is the same tiny model, decoded greedily: the same answers, the same relevance.
    assert relevance["tuned"]["mean_cosine"] == pytest.approx(relevance["baseline"]["mean_cosine"])
    assert relevance.get("relevance_ratio", 1.0) == pytest.approx(1.0)
    if "relevance_ratio" in relevance:  # paired: the same answers leave the ratio no spread
        assert relevance["relevance_ratio_interval"] == pytest.approx([1.0, 1.0])
        assert "1.00x (95% interval 1.00-1.00" in report
    assert result["real_results"]["tuned"]["verbosity"][0]["prompts"] == 2
    assert set(result["real_steerability"]["baseline"]["verbosity"]) == {"words", "apm_verbosity"}
    assert "## Real-style prompts" in report and "| tuned | " in report.split("## Real-style prompts")[1]
    assert "| prompt | tuned | baseline |" in report  # answers at the defaults, side by side
    assert report.split("## Real-style prompts")[1].count("| verbosity | words |") == 1
    first_real = parse_prompt_turns(real_prompts(extra["real_prompts"], 1)[0])[-1].text
    assert f"| {first_real[:60].replace(chr(10), '<br>')}" in report
    assert metrics["real_results"]["tuned"]["verbosity"][0]["prompts"] == 2
    assert metrics["relevance"]["tuned"]["answers"] == 3

    tracking = TrackingConfig(runs_dir=str(tmp_path / "runs"))
    [mlrun] = runs_for(tracking, "evaluate")
    assert "steer.tuned.verbosity.words" in mlrun.data.metrics
    assert {"steer_real.tuned.verbosity.words", "relevance.baseline.mean_cosine"} <= set(mlrun.data.metrics)
    artifacts = {
        a.path for a in mlflow.MlflowClient(tracking.uri()).list_artifacts(mlrun.info.run_id, "evaluation")
    }
    assert "evaluation/report.md" in artifacts

    if MT_BENCH.is_file():
        for name in ("tuned", "baseline"):
            answers = [
                json.loads(line)
                for line in (out / "mt_bench" / "model_answer" / f"helpsteer-{name}.jsonl")
                .read_text()
                .splitlines()
            ]
            assert [a["question_id"] for a in answers] == [81, 91, 101, 111, 121, 131, 141, 151]
            assert all(
                len(a["choices"][0]["turns"]) == 2 and a["model_id"] == f"helpsteer-{name}" for a in answers
            )


def test_compare_sets_a_full_and_an_ablated_run_side_by_side(ray_head, models, synthetic_filtered, tmp_path):
    """The paper's ablation: the same generator evaluated with complexity left out of its attribute
    line (examples.condition_on) cannot follow complexity at all, whatever is asked, and
    `helpsteer compare` puts both runs and the untuned model in one table."""
    generator, apm = models
    ablated = tmp_path / "ablated"
    shutil.copytree(generator, ablated)
    setup = yaml.safe_load((ablated / "sft_config.yaml").read_text())
    setup["examples"]["condition_on"] = ["helpfulness", "correctness", "coherence", "verbosity"]
    (ablated / "sft_config.yaml").write_text(yaml.safe_dump(setup))
    extra = {
        "attribute_prompts": {"verbosity": 2},
        "max_new_tokens": 4,
        "real_prompts": _real_prompt_files(tmp_path),
        "real_relevance_prompts": 2,
        "real_attribute_prompts": {"complexity": 2},
    }
    run(_config(models, synthetic_filtered, tmp_path / "full", **extra))
    run(_config((ablated, apm), synthetic_filtered, tmp_path / "ablated-run", baseline="none", **extra))
    out = tmp_path / "compare"
    done = subprocess.run(
        [HELPSTEER, "compare", str(tmp_path / "full" / "eval"), str(tmp_path / "ablated-run" / "eval"),
         "--name", "full", "--name", "no complexity", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = (out / "compare.md").read_text()
    runs = {r["name"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(runs) == ["full", "no complexity", "untuned (full)"]
    assert runs["no complexity"]["conditioned_note"] == "helpfulness, correctness, coherence, verbosity"
    assert runs["full"]["conditioned_note"] == "all"
    # Left out of the prompt, complexity cannot move the (greedy) answers: the same text at every level.
    answers = pq.read_table(tmp_path / "ablated-run" / "eval" / "responses.parquet").to_pylist()
    swept = [r for r in answers if r["attribute"] == "complexity" and r["prompt_set"] == "real"]
    for prompt_id in {r["prompt_id"] for r in swept}:
        assert len({r["response"] for r in swept if r["prompt_id"] == prompt_id}) == 1
    assert runs["no complexity"]["steer"]["complexity"] == {
        "prompt_set": "real", "prompts": 2, "text_measure": "fk_grade", "text": 0.0, "apm": 0.0,
    }  # fmt: skip
    # Every figure is the evaluation's own: steerability from metrics.json, APM means from the answers.
    metrics = json.loads((tmp_path / "full" / "eval" / "metrics.json").read_text())
    [words, apm_verbosity] = metrics["results"]["tuned"]["verbosity"]
    assert runs["full"]["steer"]["verbosity"]["text"] == words["within_prompt"]
    assert runs["full"]["steer"]["verbosity"]["apm"] == apm_verbosity["within_prompt"]
    full_answers = pq.read_table(tmp_path / "full" / "eval" / "responses.parquet").to_pylist()
    at_defaults = [
        r["apm_verbosity"]
        for r in full_answers
        if r["model"] == "tuned" and r["prompt_set"] == "real" and r["attribute"] is None
    ]
    assert runs["full"]["answers_at_defaults"] == len(at_defaults) == 2
    assert runs["full"]["apm_at_defaults"]["verbosity"] == pytest.approx(sum(at_defaults) / 2)
    assert "| no complexity | helpfulness, correctness, coherence, verbosity |" in report
    assert "## The APM's mean scores at the default attributes" in report
    assert (out / "compare.png").stat().st_size > 1000
    assert "no complexity" in done.stdout


def test_generator_actor_samples_in_the_configured_cpu_dtype(models):
    """`cpu_dtype: bfloat16` (the local profile's) loads the actor's model in bf16 and it answers."""
    import numpy as np
    import torch

    from ray_jobs.generation import Generator

    generator, _ = models
    setup = yaml.safe_load((generator / "sft_config.yaml").read_text())
    turns = json.dumps([{"role": "User", "text": "Name a planet."}])
    batch = {
        "request_id": np.array([0, 1]),
        "turns": np.array([turns, turns], dtype=object),
        "attributes": np.array([json.dumps({"verbosity": 0}), json.dumps({"verbosity": 4})], dtype=object),
    }
    for dtype, expected in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        sampling = {"temperature": 0.7, "top_p": 0.95, "seed": 0, "threads": 1, "cpu_dtype": dtype}
        actor = Generator(str(generator), setup["examples"], 4, sampling)
        assert actor.model.dtype == expected
        out = actor(batch)
        assert list(out["request_id"]) == [0, 1] and all(0 <= n <= 4 for n in out["new_tokens"])


def test_bad_input_fails_before_generation(models, synthetic_filtered, tmp_path):
    with pytest.raises(AttributeValueError, match="verbosty"):
        run(_config(models, synthetic_filtered, tmp_path, attributes=["verbosty"]))
    broken = tmp_path / "question.jsonl"
    broken.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"question.jsonl:2: needs question_id and turns"):
        run(_config(models, synthetic_filtered, tmp_path, mt_bench=str(broken)))
    with pytest.raises(ValueError, match="fewer than prompts=500"):
        run(_config(models, synthetic_filtered, tmp_path, prompts=500))
    with pytest.raises(ValueError, match="attribute_prompts: coherence"):
        run(_config(models, synthetic_filtered, tmp_path, attribute_prompts={"coherence": 3}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is rain?"}\n{"prompt": ""}\n')
    with pytest.raises(
        ValueError, match=r"prompts.jsonl:2: field `prompt`: needs a non-empty `prompt` string"
    ):
        run(_config(models, synthetic_filtered, tmp_path, real_prompts=[str(prompts)]))
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        run(_config(models, synthetic_filtered, tmp_path, real_prompts=[str(tmp_path / "nowhere.txt")]))
    prompts.write_text('{"prompt": "What is rain?"}\n{"turns": ["Name a river."]}\n')
    with pytest.raises(ValueError, match="2 distinct prompts in .*prompts.jsonl \\(2\\), fewer than the 24"):
        run(_config(models, synthetic_filtered, tmp_path, real_prompts=[str(prompts)]))
    with pytest.raises(ValueError, match="real_attribute_prompts: coherence: 2; allowed: a swept attribute"):
        run(
            _config(
                models,
                synthetic_filtered,
                tmp_path,
                real_prompts=[str(prompts)],
                real_relevance_prompts=2,
                real_attribute_prompts={"coherence": 2},
            )
        )
    with pytest.raises(
        ValueError, match="real_attribute_prompts: set, but real_prompts names no prompt files"
    ):
        run(_config(models, synthetic_filtered, tmp_path, real_attribute_prompts={"verbosity": 2}))
    assert not (tmp_path / "eval").exists()
