"""The main job (`helpsteer run`) end to end on a small synthetic set with tiny models: every stage
runs in order under one parent MLflow run, a second run skips every stage, a changed SFT setting
reruns only train_sft and evaluate, and --from / --until run part of it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml

from helpsteer_core.attributes import HELPSTEER_ATTRIBUTES, LevelScale
from helpsteer_core.config import load_config
from helpsteer_core.oasst import OASST_ATTRIBUTES
from ray_jobs.pipeline import RECORDS as RECORDS_FOLDER
from ray_jobs.pipeline import PipelineConfig, main, run
from ray_jobs.tracking import TrackingConfig, runs_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _overrides(runs: Path, tiny_backbone: Path, tiny_generator: Path) -> list[str]:
    return [
        f"runs_dir={runs}",
        "synthetic.rows=160",
        f"apm.apm.backbone={tiny_backbone}",
        "apm.max_steps=3",
        "apm.eval_every=3",
        "relabel.rows_per_unit=50",
        f"sft.generator={tiny_generator}",
        "sft.examples.max_length=192",
        "sft.max_steps=3",
        "sft.checkpoint_every=3",
        "sft.eval_every=3",
        "sft.lr=1e-3",
        "evaluate.prompts=2",
        "evaluate.attribute_prompts={}",
        "evaluate.attributes=[verbosity, complexity]",
        "evaluate.max_new_tokens=8",
        "evaluate.mt_bench_max_new_tokens=4",
        "evaluate.real_relevance_prompts=2",
        "evaluate.real_attribute_prompts={verbosity: 2}",
    ]


def _synthetic_sft(runs: Path, tiny_backbone: Path, tiny_generator: Path) -> list[str]:
    """The tiny generator cannot write answers worth keeping: AC-SFT on the filter's rows."""
    return [
        *_overrides(runs, tiny_backbone, tiny_generator),
        "data=null",  # the built-in HelpSteer-style source alone
        "answers=null",
        "sft.repeat=[]",  # the profile repeats answer rows by style; the filter's rows have none
        "sft.attribute_source=prefer_human",
    ]


def _stage_runs(runs: Path) -> list[list[str]]:
    """The stages of each pipeline run's nested runs, oldest pipeline run first."""
    client = mlflow.MlflowClient(TrackingConfig(runs_dir=str(runs)).uri())
    found = client.search_runs([client.get_experiment_by_name("helpsteer").experiment_id])
    parents = sorted(
        (r.info.start_time, r.info.run_id) for r in found if r.data.tags.get("stage") == "pipeline"
    )
    return [
        sorted(r.data.tags["stage"] for r in found if r.data.tags.get("mlflow.parentRunId") == run_id)
        for _, run_id in parents
    ]


def _loss_steps(runs: Path) -> list[int]:
    """The steps of the latest train_sft run's loss history."""
    tracking = TrackingConfig(runs_dir=str(runs))
    latest = runs_for(tracking, "train_sft")[0]
    history = mlflow.MlflowClient(tracking.uri()).get_metric_history(latest.info.run_id, "loss")
    return sorted(m.step for m in history)


@pytest.fixture(scope="module")
def first_run(ray_head, tiny_backbone, tiny_generator, tmp_path_factory):
    runs = tmp_path_factory.mktemp("pipeline") / "runs"
    overrides = _synthetic_sft(runs, tiny_backbone, tiny_generator)
    config = load_config(PipelineConfig, REPO / "configs" / "local.yaml", overrides)
    return runs, overrides, run(config)


def test_local_profile_runs_every_stage_under_one_parent_run(first_run):
    runs, _, summary = first_run
    assert summary["filter"]["total"]["input_rows"] == 160
    assert (runs / "apm" / "evaluation" / "metrics.json").is_file()
    relabelled = [
        r for f in sorted((runs / "relabelled").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert len(relabelled) == summary["filter"]["total"]["train"] == summary["relabel"]["output_rows"]
    assert {"helpfulness", "apm_helpfulness", "apm_helpfulness_int"} <= set(relabelled[0])
    assert (runs / "sft" / "model.safetensors").is_file() and summary["train_sft"]["steps"] == 3
    report = (runs / "eval" / "report.md").read_text()
    assert "| verbosity | words |" in report and "| complexity | fk_grade |" in report
    # The report says how long the answers and the tuned model's training took.
    trained = json.loads((runs / "sft" / "training.json").read_text())
    assert trained["steps"] == 3 and trained["seconds"] > 0
    assert f"the tuned generator's AC-SFT: 3 steps in {trained['seconds']:.0f} s" in report
    assert set(summary["evaluate"]["steerability"]) == {"tuned", "baseline"}
    assert _stage_runs(runs) == [["evaluate", "filter_data", "relabel", "train_apm", "train_sft"]]
    client = mlflow.MlflowClient(TrackingConfig(runs_dir=str(runs)).uri())
    [parent] = [
        r
        for r in client.search_runs([client.get_experiment_by_name("helpsteer").experiment_id])
        if r.data.tags.get("stage") == "pipeline"
    ]
    saved = client.download_artifacts(parent.info.run_id, "pipeline_summary.json", str(runs.parent))
    assert json.loads(Path(saved).read_text())["relabel"]["output_rows"] == len(relabelled)


def test_second_run_skips_every_stage_and_a_changed_sft_setting_reruns_only_sft_and_evaluate(first_run):
    runs, overrides, first = first_run
    started = time.perf_counter()
    again = run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", overrides))
    assert time.perf_counter() - started < 30  # nothing trains; the bound only catches a rerun
    assert again == json.loads(json.dumps(first, default=str))
    assert _stage_runs(runs)[-1] == []  # every stage skipped: no nested run

    # Settings that only change speed are in no key: nothing reruns.
    speed = [
        *overrides,
        "relabel.actors=1",
        "sft.checkpoint_every=1",
        "apm.checkpoint_every=1",
        "filter.batch_size=7",
    ]
    assert run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", speed)) == again
    assert _stage_runs(runs)[-1] == []

    changed = run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", [*overrides, "sft.lr=5e-4"]))
    assert _stage_runs(runs)[-1] == ["evaluate", "train_sft"]
    assert changed["filter"] == again["filter"] and changed["train_apm"] == again["train_apm"]
    assert changed["train_sft"]["out"] != first["train_sft"]["out"]
    assert _loss_steps(runs) == [1, 2, 3]  # a new run under its own identity, not the old one resumed
    assert (runs / "sft").resolve() == Path(changed["train_sft"]["out"]).resolve()

    # Back to the first settings: nothing reruns, and runs/sft links the first settings' model again.
    run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", overrides))
    assert _stage_runs(runs)[-1] == []
    assert (runs / "sft").resolve() == Path(first["train_sft"]["out"]).resolve()


def test_from_and_until_run_part_of_the_pipeline(first_run, capsys):
    runs, overrides, _ = first_run
    profile = str(REPO / "configs" / "local.yaml")
    assert (
        main(["--config", profile, "--from", "relabel", "--until", "relabel", *overrides, "force=true"]) == 0
    )
    assert _stage_runs(runs)[-1] == ["relabel"]
    stats = json.loads((runs / "relabelled" / "stats.json").read_text())
    assert stats["units_skipped_as_done"] == 0 and stats["rows_relabelled_now"] == stats["output_rows"]
    # force retrains: the loss history starts at step 1 again (not the finished run re-exported).
    assert (
        main(["--config", profile, "--from", "train_sft", "--until", "train_sft", *overrides, "force=true"])
        == 0
    )
    assert _stage_runs(runs)[-1] == ["train_sft"]
    assert _loss_steps(runs) == [1, 2, 3]
    # --from a stage whose inputs were never made is an error that names the missing stage.
    fresh = runs.parent / "fresh"
    assert main(["--config", profile, "--from", "train_sft", *overrides, f"runs_dir={fresh}"]) == 2
    assert "the earlier stage filter has no complete output" in capsys.readouterr().err


def test_a_variant_shares_every_stage_before_sft_and_is_compared_with_the_main_run(first_run):
    """An ablation as the paper ran them: complexity left out of the attribute line. Only the
    variant's train_sft and evaluate run; runs/compare puts it beside the main run."""
    runs, overrides, _ = first_run
    main_sft = (runs / "sft").readlink()
    ablation = (
        "variants=[{name: no-complexity, sft: {examples: "
        "{condition_on: [helpfulness, correctness, coherence, verbosity]}}}]"
    )
    summary = run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", [*overrides, ablation]))
    assert _stage_runs(runs)[-1] == ["evaluate", "train_sft"]  # the variant's two; the rest skipped
    assert (runs / "sft").readlink() == main_sft  # the links stay the main run's
    variant_sft = Path(summary["train_sft [no-complexity]"]["out"])
    assert variant_sft != runs / main_sft
    examples = yaml.safe_load((variant_sft / "sft_config.yaml").read_text())["examples"]
    assert examples["condition_on"] == ["helpfulness", "correctness", "coherence", "verbosity"]
    compared = {r["name"]: r for r in json.loads((runs / "compare" / "compare.json").read_text())}
    assert list(compared) == ["main", "no-complexity", "untuned (main)"]
    assert compared["no-complexity"]["folder"] == summary["evaluate [no-complexity]"]["out"]
    # The profile's line carries HelpSteer's five (sft.examples.condition_on), not all nine.
    assert compared["main"]["conditioned_note"] == ", ".join(HELPSTEER_ATTRIBUTES)
    assert (
        "| no-complexity | helpfulness, correctness, coherence, verbosity |"
        in (runs / "compare" / "compare.md").read_text()
    )
    # Run again: everything, the variant's stages included, is complete.
    run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", [*overrides, ablation]))
    assert _stage_runs(runs)[-1] == []


def test_bootstrap_round_chooses_the_apms_closest_answers_trains_round_2_and_reports_both(first_run):
    """SteerLM's bootstrapping as a pipeline stage after evaluate: the tuned generator answers
    each target several times, the APM scores them, the closest per target train a second AC-SFT
    round from the round-1 weights, and the report gives the held-out distance of both rounds."""
    runs, overrides, _ = first_run
    section = (
        "bootstrap={questions: 2, targets_per_question: 2, candidates: 3, max_new_tokens: 8, "
        "batch_size: 12, held_out: 2, sft: {max_steps: 2, checkpoint_every: 2, micro_batch_size: 1, "
        "accumulation_steps: 2}}"
    )
    summary = run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", [*overrides, section]))
    assert _stage_runs(runs)[-1] == ["bootstrap"]  # every earlier stage was complete
    out = runs / "bootstrapped"
    assert out.resolve() == Path(summary["bootstrap"]["out"]).resolve()
    scored = [
        r
        for f in sorted((out / "round-1" / "scored").glob("part-*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    chosen = pq.read_table(out / "chosen" / "part-000000.parquet").to_pylist()
    rejected = sum(1 for line in (out / "round-1" / "rejects.jsonl").read_text().splitlines() if line)
    assert len(scored) + rejected == 2 * 2 * 3  # questions x targets x candidates, reconciled
    assert sorted(r["target_id"] for r in chosen) == sorted({r["target_id"] for r in scored})
    for row in chosen:  # the closest of its target's candidates by the APM's scores
        mine = [r for r in scored if r["target_id"] == row["target_id"]]
        closest = min(
            mine,
            key=lambda r: (
                sum((r[f"apm_{n}"] - r[f"target_{n}"]) ** 2 for n in ("verbosity", "complexity")),
                r["candidate"],
            ),
        )
        assert (row["candidate"], row["response"]) == (closest["candidate"], closest["response"])
        assert row["chosen_from"] == len(mine) and 0 <= row["target_verbosity"] <= 4
    # Round 2 trained from the round-1 model on the chosen rows, with the bootstrap's steps.
    setup = yaml.safe_load((out / "sft" / "sft_config.yaml").read_text())
    assert Path(setup["generator"]).resolve() == (runs / "sft").resolve()
    assert Path(setup["data"]).resolve() == (out / "chosen").resolve()
    assert setup["max_steps"] == 2 and setup["repeat"] == []
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == len(chosen) and report["held_out"]["prompts"] == 2
    for round_name in ("round_1", "round_2"):
        assert report["held_out"][round_name]["rows"] >= 1
        assert report["held_out"][round_name]["distance"] >= 0
    assert report["training"]["chosen"]["distance"] <= report["training"]["candidates"]["distance"]
    assert "| held out (2 prompts): round 2 |" in (out / "report.md").read_text()
    # Complete: a second run skips it.
    run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", [*overrides, section]))
    assert _stage_runs(runs)[-1] == []


def test_local_profile_trains_on_the_generators_own_answers_labelled_by_the_apm(
    ray_head, tiny_backbone, tmp_path_factory
):
    """The local profile as shipped (answers on): synthetic HelpSteer-style rows and OpenAssistant-
    format trees train the APM, reported per source; the packaged SmolLM2 writes answers, the APM
    labels them, AC-SFT trains on them at the APM's quantile levels (HelpSteer's five in the
    attribute line), and the evaluation reports relevance on real-style prompts, tuned beside untuned."""
    runs = tmp_path_factory.mktemp("answers") / "runs"
    overrides = [
        f"runs_dir={runs}",
        "synthetic.rows=120",
        "synthetic.oasst_trees=20",
        f"apm.apm.backbone={tiny_backbone}",
        "apm.max_steps=2",
        "apm.eval_every=2",
        "answers.questions=3",
        "answers.styles=[one_sentence, child_example]",
        "answers.max_new_tokens=48",
        "answers.batch_size=6",
        "sft.micro_batch_size=1",
        "sft.accumulation_steps=2",
        "sft.max_steps=2",
        "sft.checkpoint_every=2",
        "evaluate.prompts=1",
        "evaluate.attributes=[verbosity]",
        "evaluate.max_new_tokens=8",
        "evaluate.mt_bench_max_new_tokens=4",
        "evaluate.real_relevance_prompts=2",
        "evaluate.real_attribute_prompts={verbosity: 1}",
    ]
    config = load_config(PipelineConfig, REPO / "configs" / "local.yaml", overrides)
    summary = run(config)
    sources = summary["filter"]["sources"]
    assert set(sources) == {"helpsteer", "oasst"} and sources["helpsteer"]["input_rows"] == 120
    assert sources["oasst"]["kept"] > 20  # one row per assistant turn of 20 trees
    apm_report = json.loads((runs / "apm" / "evaluation" / "metrics.json").read_text())
    assert set(apm_report["sources"]["helpsteer"]["attributes"]) == set(HELPSTEER_ATTRIBUTES)
    assert set(apm_report["sources"]["oasst"]["attributes"]) == set(OASST_ATTRIBUTES)
    answers = pq.read_table(runs / "answers" / "kept" / "part-000000.parquet").to_pylist()
    # kept/ holds every kept answer plus its shorter versions (the profile's `shorter: [1, 2, 4]`).
    assert summary["generate_answers"]["rows"] == len(answers) >= 3
    assert summary["generate_answers"]["kept"] == sum(r["first_sentences"] is None for r in answers)
    relabelled = [
        r for f in sorted((runs / "relabelled").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert [r["response"] for r in relabelled] == [r["response"] for r in answers]
    assert {"style", "apm_verbosity", "apm_complexity", "apm_quality", "apm_humor"} <= set(relabelled[0])
    # The attribute line carries HelpSteer's five, the fixed three at 4 (sft.examples.condition_on).
    sft_config = yaml.safe_load((runs / "sft" / "sft_config.yaml").read_text())
    assert sft_config["examples"]["condition_on"] == list(HELPSTEER_ATTRIBUTES)
    levels = json.loads((runs / "sft" / "attribute_levels.json").read_text())
    assert levels["scope"] == "all" and levels["answer_level"] == ["complexity"]
    cuts = levels["cuts"]["verbosity"]
    assert len(cuts) == 4 and cuts == sorted(cuts)
    assert sum(levels["rows_per_level"]["verbosity"]) == len(answers)
    assert summary["train_sft"]["data"]["examples"] == len(answers)
    # The profile's repeat rule: the registers' one-sentence versions (the child's among them),
    # as many times as the profile says.
    (rule,) = config.sft.repeat
    register = [r for r in answers if r["style"] in rule.where["style"] and r["first_sentences"] == 1]
    assert register and {r["style"] for r in register} == {"child_example"}
    assert summary["train_sft"]["data"]["repeated_rows"] == len(register)
    assert summary["train_sft"]["data"]["repeated_examples"] == (rule.times - 1) * len(register)
    relevance = summary["evaluate"]["relevance"]
    assert set(relevance) >= {"tuned", "baseline", "relevance_ratio"}
    assert -1 <= relevance["tuned"]["mean_cosine"] <= 1
    low, high = relevance["relevance_ratio_interval"]
    assert low <= relevance["relevance_ratio"] <= high
    # The profile answers the first MT-Bench question of each category, both turns, for `helpsteer judge`.
    for model in ("tuned", "baseline"):
        lines = (
            (runs / "eval" / "mt_bench" / "model_answer" / f"helpsteer-{model}.jsonl")
            .read_text()
            .splitlines()
        )
        assert [json.loads(line)["question_id"] for line in lines] == [81, 91, 101, 111, 121, 131, 141, 151]
    assert "## Real-style prompts" in (runs / "eval" / "report.md").read_text()
    assert _stage_runs(runs) == [
        ["evaluate", "filter_data", "generate_answers", "relabel", "train_apm", "train_sft"]
    ]

    # Bootstrapping this model, which learnt ranked levels: each candidate's APM scores are placed
    # on its levels (its cut points) before the closest is chosen, and round 2 keeps those cuts.
    section = (
        "bootstrap={questions: 2, targets_per_question: 1, candidates: 2, max_new_tokens: 8, batch_size: 4, "
        "held_out: 1, sft: {max_steps: 1, checkpoint_every: 1, micro_batch_size: 1, accumulation_steps: 1}}"
    )
    run(load_config(PipelineConfig, REPO / "configs" / "local.yaml", [*overrides, section]))
    out, scale, vary = runs / "bootstrapped", LevelScale.read(runs / "sft"), ("verbosity", "complexity")
    assert scale is not None and scale.cuts["verbosity"] == cuts
    scored = [
        r
        for f in sorted((out / "round-1" / "scored").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    chosen = pq.read_table(out / "chosen" / "part-000000.parquet").to_pylist()
    assert len(chosen) == 2
    for row in chosen:
        mine = [r for r in scored if r["target_id"] == row["target_id"]]
        on_levels = min(
            mine,
            key=lambda r: (
                sum((scale.place(n, r[f"apm_{n}"]) - r[f"target_{n}"]) ** 2 for n in vary),
                r["candidate"],
            ),
        )
        assert row["candidate"] == on_levels["candidate"]
        assert row["level_verbosity"] == scale.place("verbosity", row["apm_verbosity"]) in (0, 1, 2, 3, 4)
    round_2 = json.loads((out / "sft" / "attribute_levels.json").read_text())
    assert round_2["cuts"] == levels["cuts"]  # round 2's levels mean what round 1's did
    report = json.loads((out / "report.json").read_text())
    assert report["scale"] == {"verbosity": "levels", "complexity": "levels"}
    assert "placed on the round-1 model's levels" in (out / "report.md").read_text()


def test_a_missing_real_prompt_file_fails_before_any_stage_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    profile = str(REPO / "configs" / "local.yaml")
    missing = tmp_path / "nope.jsonl"
    assert main(["--config", profile, f"runs_dir={runs}", f"evaluate.real_prompts=[{missing}]"]) == 2
    assert f"{missing}: no prompt file there" in capsys.readouterr().err
    assert not (runs / RECORDS_FOLDER).exists()


def _several_sources(runs: Path, tiny_backbone: Path, tiny_generator: Path, oasst_sft: str) -> list[str]:
    """The paper's shape on tiny models: HelpSteer rows and OpenAssistant trees train the APM,
    the OpenAssistant turns are relabelled and AC-SFT conditions on the APM's labels for them."""
    from shared_data import shared_file

    sources = [
        {"name": "helpsteer", "path": str(shared_file("helpsteer2/train_rows_001_060.jsonl"))},
        {
            "name": "oasst",
            "path": str(shared_file("oasst/fixture_a.trees.jsonl")),
            "sft": oasst_sft,
            "repeat": 2,
        },
    ]
    return [
        *_synthetic_sft(runs, tiny_backbone, tiny_generator),
        f"data={json.dumps(sources)}",
        "filter.filters.required_attributes=[]",  # OpenAssistant turns carry four attributes, not five
        "filter.split.validation_fraction=0.3",
        "sft.examples.max_length=384",
        "sft.answer_level=[]",  # the profile's rule for generated answers' registers
    ]


def test_several_sources_train_one_apm_and_sft_reads_the_apms_labels_only_where_asked(
    ray_head, tiny_backbone, tiny_generator, tmp_path_factory
):
    runs = tmp_path_factory.mktemp("sources") / "runs"
    # apm_quantile: the APM's predictions ranked into levels, so any change in their order shows.
    overrides = _several_sources(runs, tiny_backbone, tiny_generator, oasst_sft="apm_quantile")
    profile = REPO / "configs" / "local.yaml"
    summary = run(load_config(PipelineConfig, profile, [*overrides, "until_stage=train_sft"]))

    per_source = summary["filter"]["sources"]
    assert set(per_source) == {"helpsteer", "oasst"} and all(c["reconciles"] for c in per_source.values())
    report = json.loads((runs / "apm" / "evaluation" / "metrics.json").read_text())
    assert set(report["sources"]) == {"helpsteer", "oasst"}
    assert {"quality", "helpfulness"} <= set(report["attributes"])
    train = [
        r
        for f in sorted((runs / "filtered" / "train").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    oasst_train = [r for r in train if r["data_source"] == "oasst"]
    assert summary["relabel"]["output_rows"] == len(oasst_train) > 0
    assert summary["relabel"]["other_sources"] == {"helpsteer": len(train) - len(oasst_train)}
    relabelled = [
        r for f in sorted((runs / "relabelled").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert all(r["apm_quality_int"] is not None for r in relabelled)
    assert summary["train_sft"]["data"]["examples"] == len(oasst_train)
    assert summary["train_sft"]["data"]["repeated_examples"] == len(oasst_train)  # repeat: 2
    recorded = yaml.safe_load((runs / "sft" / "sft_config.yaml").read_text())
    assert recorded["attribute_source"] == {"oasst": "apm_quantile"}
    levels = json.loads((runs / "sft" / "attribute_levels.json").read_text())
    assert sum(levels["rows_per_level"]["quality"]) == len(oasst_train)  # ranked among its rows

    # Another APM (other lr and seed): relabel reruns, and so does AC-SFT, whose examples read its labels.
    other_apm = [*overrides, "apm.lr=3e-4", "apm.seed=7", "until_stage=train_sft"]
    changed = run(load_config(PipelineConfig, profile, other_apm))
    assert changed["train_apm"]["model"] != summary["train_apm"]["model"]
    assert changed["relabel"]["apm"] != summary["relabel"]["apm"]
    assert changed["train_sft"]["out"] != summary["train_sft"]["out"]

    # The same two APMs when AC-SFT takes the OpenAssistant turns' own labels: the examples do not
    # change with the APM, so neither does AC-SFT's key (its output is reused, not retrained).
    human = _several_sources(runs, tiny_backbone, tiny_generator, oasst_sft="human")
    first = run(load_config(PipelineConfig, profile, [*human, "until_stage=train_sft"]))
    second = run(
        load_config(PipelineConfig, profile, [*human, "apm.lr=3e-4", "apm.seed=7", "until_stage=train_sft"])
    )
    assert second["relabel"]["apm"] != first["relabel"]["apm"]
    assert second["train_sft"]["out"] == first["train_sft"]["out"]
    # That APM and its relabelling ran above (relabel labels the sources AC-SFT trains on, whatever
    # their labels' origin): nothing runs at all, AC-SFT included.
    assert _stage_runs(runs)[-1] == []
