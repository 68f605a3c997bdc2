"""The APM training stage on a local Ray cluster: 2 DDP workers, checkpoints, resume, evaluation
against human labels, MLflow run and registry."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from helpsteer_core.apm import AttributePredictionModel, load_trained_attributes
from helpsteer_core.attributes import HELPSTEER_ATTRIBUTES, STEERLM
from ray_jobs.tracking import TrackingConfig, runs_for
from ray_jobs.train_apm import REGISTERED_NAME, TrainAPMConfig, run

pytestmark = pytest.mark.slow


def test_stage_exports_an_evaluated_registered_model(trained_apm):
    # Training ran in the workers and the evaluation in a task: the driver loaded no model.
    assert trained_apm.driver_loads == []
    folder = trained_apm.model
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["head.safetensors", "model.safetensors"]
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    model = AttributePredictionModel.from_pretrained(folder, STEERLM)
    assert model.schema == STEERLM
    # Only the five HelpSteer attributes had labels; the other four outputs are marked untrained.
    assert load_trained_attributes(folder) == list(HELPSTEER_ATTRIBUTES)

    report = json.loads((folder / "evaluation" / "metrics.json").read_text())
    assert report["model"] == str(folder)  # the published folder, not the staging one
    assert set(report["attributes"]) == set(HELPSTEER_ATTRIBUTES)
    for metrics in report["attributes"].values():
        for key in ("pearson", "spearman", "mae", "rmse", "qwk", "baseline_mae", "baseline_rmse"):
            assert key in metrics
        assert metrics["rmse"] >= 0 and metrics["n"] == report["rows"]
    assert (folder / "evaluation" / "predictions.png").stat().st_size > 1000

    tracking = TrackingConfig(runs_dir=str(trained_apm.runs))
    [mlrun] = runs_for(tracking, "train_apm")
    assert mlrun.info.status == "FINISHED"
    history = mlflow.MlflowClient(tracking.uri()).get_metric_history(mlrun.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert "eval.verbosity.rmse" in mlrun.data.metrics
    versions = mlflow.MlflowClient(tracking.uri()).search_model_versions(f"name='{REGISTERED_NAME}'")
    assert [v.source for v in versions] == [folder.as_uri()]
    assert versions[0].run_id == mlrun.info.run_id


def test_rerun_with_the_same_name_resumes_from_the_last_checkpoint(trained_apm, tiny_backbone, tmp_path):
    config = TrainAPMConfig.model_validate(
        {
            "data": str(trained_apm.data),
            "out": str(tmp_path / "apm"),
            "apm": {"backbone": str(tiny_backbone)},
            "num_workers": 2,
            "batch_size": 8,
            "max_steps": 9,
            "eval_every": 3,
            "checkpoint_every": 3,
            "lr": 1e-3,
            "run_name": trained_apm.run_name,
            "storage": str(trained_apm.storage),
            "tracking": {"runs_dir": str(tmp_path / "runs")},
        }
    )
    run(config)
    tracking = TrackingConfig(runs_dir=str(tmp_path / "runs"))
    [mlrun] = runs_for(tracking, "train_apm")
    steps = [
        m.step for m in mlflow.MlflowClient(tracking.uri()).get_metric_history(mlrun.info.run_id, "loss")
    ]
    assert steps == [7, 8, 9]  # steps 1-6 came from the first run's checkpoint
    # Fewer steps than the run has reached: refused before any worker starts, not the step-9
    # model exported as a 3-step one (max_steps is not part of the identity).
    short = tmp_path / "apm-short"
    with pytest.raises(ValueError, match=r"max_steps 3: .* has trained to step 9 already.*max_steps >= 9"):
        run(config.model_copy(update={"max_steps": 3, "out": str(short)}))
    assert not short.exists()
    # By epochs as well: the driver counts the steps from the training rows, so a run asked for
    # fewer epochs than its checkpoints reached is refused the same way.
    with pytest.raises(ValueError, match=r"epochs 0.05 \(\d+ steps?\): .* has trained to step 9 already"):
        run(config.model_copy(update={"max_steps": None, "epochs": 0.05, "out": str(short)}))
    assert not short.exists()


def test_a_changed_lr_under_the_same_name_trains_a_new_run_from_step_1(trained_apm, tiny_backbone, tmp_path):
    """The same run_name and storage with another lr: not the old run resumed (or re-exported) but a
    new one, from step 1, under its own identity; the old run's checkpoints stay."""
    config = TrainAPMConfig.model_validate(
        {
            "data": str(trained_apm.data),
            "out": str(tmp_path / "apm"),
            "apm": {"backbone": str(tiny_backbone)},
            "num_workers": 2,
            "batch_size": 8,
            "max_steps": 6,
            "eval_every": 6,
            "checkpoint_every": 6,  # speed-only: not part of the identity
            "lr": 3e-4,
            "run_name": trained_apm.run_name,
            "storage": str(trained_apm.storage),
            "tracking": {"runs_dir": str(tmp_path / "runs")},
        }
    )
    run(config)
    tracking = TrackingConfig(runs_dir=str(tmp_path / "runs"))
    [mlrun] = runs_for(tracking, "train_apm")
    history = mlflow.MlflowClient(tracking.uri()).get_metric_history(mlrun.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    runs = sorted(p.name for p in trained_apm.storage.glob(f"{trained_apm.run_name}-*"))
    assert len(runs) == 2  # the first run's folder is kept beside the new one
    first = AttributePredictionModel.from_pretrained(trained_apm.model, STEERLM)
    second = AttributePredictionModel.from_pretrained(tmp_path / "apm", STEERLM)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_missing_data_fails_before_ray_work(tmp_path):
    config = TrainAPMConfig.model_validate({"data": str(tmp_path / "nothing"), "out": str(tmp_path / "apm")})
    with pytest.raises(FileNotFoundError, match="run the filter stage first"):
        run(config)


def test_helpsteer2_sample_trains_evaluates_and_relabels_keeping_human_columns(
    ray_head, tiny_backbone, helpsteer2_sample, tmp_path
):
    import pyarrow.parquet as pq

    from ray_jobs.filter_data import FilterStageConfig
    from ray_jobs.filter_data import run as run_filter
    from ray_jobs.relabel import RelabelConfig
    from ray_jobs.relabel import run as run_relabel

    tracking = {"runs_dir": str(tmp_path / "runs")}
    run_filter(
        FilterStageConfig.model_validate(
            {
                "data": str(helpsteer2_sample),
                "out": str(tmp_path / "filtered"),
                "split": {"validation_fraction": 0.3},
                "tracking": tracking,
            }
        )
    )
    report = run(
        TrainAPMConfig.model_validate(
            {
                "data": str(tmp_path / "filtered"),
                "out": str(tmp_path / "apm"),
                "apm": {"backbone": str(tiny_backbone)},
                "num_workers": 2,
                "batch_size": 4,
                "max_steps": 4,
                "eval_every": 2,
                "checkpoint_every": 4,
                "run_name": "hs2",
                "storage": str(tmp_path / "ray_train"),
                "tracking": tracking,
            }
        )
    )
    assert set(report["attributes"]) == set(HELPSTEER_ATTRIBUTES)
    assert all(m["n"] == report["rows"] > 0 for m in report["attributes"].values())

    # Unseen rows: the validation prompts never met the APM in training.
    stats = run_relabel(
        RelabelConfig.model_validate(
            {
                "apm": str(tmp_path / "apm"),
                "data": str(tmp_path / "filtered" / "validation"),
                "out": str(tmp_path / "relabelled"),
                "tracking": tracking,
            }
        )
    )
    before = [
        r
        for f in sorted((tmp_path / "filtered" / "validation").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    after = [
        r
        for f in sorted((tmp_path / "relabelled").glob("part-*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    assert stats["output_rows"] == len(before) == len(after)
    for human, relabelled in zip(before, after, strict=True):
        for name in HELPSTEER_ATTRIBUTES:
            assert relabelled[name] == human[name]  # the human label, untouched
            assert f"apm_{name}" in relabelled


def test_deepspeed_zero3_trains_a_decoder_apm_and_resumes(
    ray_head, tiny_generator, synthetic_filtered, tmp_path
):
    """The 13B profile's path at toy size: a Llama backbone read at its last token, partitioned
    across 2 workers by ZeRO-3, exported consolidated, then resumed from DeepSpeed's checkpoint."""
    values = {
        "data": str(synthetic_filtered),
        "out": str(tmp_path / "apm"),
        "apm": {"backbone": str(tiny_generator), "max_length": 256},
        "deepspeed": {"zero_stage": 3},
        "num_workers": 2,
        "batch_size": 4,
        "max_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "lr": 1e-3,
        "run_name": "zero3-apm",
        "storage": str(tmp_path / "ray_train"),
        "tracking": {"runs_dir": str(tmp_path / "runs")},
    }
    report = run(TrainAPMConfig.model_validate(values))
    assert set(report["attributes"]) == set(HELPSTEER_ATTRIBUTES)
    model = AttributePredictionModel.from_pretrained(tmp_path / "apm", STEERLM)
    assert model.is_decoder and model.readout == "last"
    # The exported head is the trained one (its bias starts at 2.0 for every attribute).
    assert not torch.allclose(model.head.bias, torch.full_like(model.head.bias, 2.0))

    run(TrainAPMConfig.model_validate(values | {"max_steps": 6}))
    tracking = TrackingConfig(runs_dir=str(tmp_path / "runs"))
    latest = runs_for(tracking, "train_apm")[0]
    history = mlflow.MlflowClient(tracking.uri()).get_metric_history(latest.info.run_id, "loss")
    assert [m.step for m in history] == [5, 6]


def test_the_apm_learns_the_planted_signal_on_the_ray_path(
    ray_head, tiny_backbone, synthetic_filtered, tmp_path
):
    """The synthetic data plants its attributes in the text (complexity in the words chosen,
    verbosity in the length asked and given): trained on Ray with 2 DDP workers, the APM must
    predict held-out rows better than the training mean does, not merely produce numbers."""
    report = run(
        TrainAPMConfig.model_validate(
            {
                "data": str(synthetic_filtered),
                "out": str(tmp_path / "apm"),
                "apm": {"backbone": str(tiny_backbone), "max_length": 256},
                "num_workers": 2,
                "batch_size": 8,
                "max_steps": 80,
                "eval_every": 40,
                "checkpoint_every": 80,
                "lr": 3e-3,
                "run_name": "learns",
                "storage": str(tmp_path / "ray_train"),
                "tracking": {"runs_dir": str(tmp_path / "runs")},
            }
        )
    )
    metrics = report["attributes"]
    learnt = {
        a: m for a, m in metrics.items() if m["rmse"] < 0.9 * m["baseline_rmse"] and (m["pearson"] or 0) > 0.5
    }
    assert {"complexity"} <= set(learnt), {
        a: (m["pearson"], m["rmse"], m["baseline_rmse"]) for a, m in metrics.items()
    }


def test_helpsteer_and_openassistant_train_one_apm_reported_per_source(
    ray_head, tiny_backbone, helpsteer2_sample, tmp_path
):
    """The paper's APM data: HelpSteer rows and OpenAssistant turns in one filter run, one APM
    trained on both with the masked loss, its agreement reported per source and attribute."""
    from shared_data import shared_file

    from helpsteer_core.apm import load_trained_attributes
    from helpsteer_core.config import ConfigError
    from helpsteer_core.oasst import OASST_ATTRIBUTES
    from ray_jobs.filter_data import FilterStageConfig
    from ray_jobs.filter_data import run as run_filter

    tracking = {"runs_dir": str(tmp_path / "runs")}
    sources = [
        {"name": "helpsteer", "path": str(helpsteer2_sample)},
        {"name": "oasst", "path": str(shared_file("oasst/fixture_a.trees.jsonl"))},
    ]
    run_filter(
        FilterStageConfig.model_validate(
            {
                "data": sources,
                "out": str(tmp_path / "filtered"),
                "split": {"validation_fraction": 0.3},
                "tracking": tracking,
            }
        )
    )
    values = {
        "data": str(tmp_path / "filtered"),
        "out": str(tmp_path / "apm"),
        "apm": {"backbone": str(tiny_backbone)},
        "num_workers": 1,
        "batch_size": 4,
        "max_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 4,
        "run_name": "paper",
        "storage": str(tmp_path / "ray_train"),
        "tracking": tracking,
    }
    report = run(TrainAPMConfig.model_validate(values))
    assert load_trained_attributes(tmp_path / "apm", STEERLM) == list(STEERLM.names)  # all nine
    per_source = report["sources"]
    assert set(per_source) == {"helpsteer", "oasst"}
    assert set(per_source["helpsteer"]["attributes"]) == set(HELPSTEER_ATTRIBUTES)
    assert (
        set(per_source["oasst"]["attributes"]) <= set(OASST_ATTRIBUTES) and per_source["oasst"]["attributes"]
    )
    assert per_source["helpsteer"]["rows"] + per_source["oasst"]["rows"] == report["rows"]
    for source in per_source.values():
        assert all(m["n"] <= source["rows"] for m in source["attributes"].values())
    written = json.loads((tmp_path / "apm" / "evaluation" / "metrics.json").read_text())
    assert written["sources"] == json.loads(json.dumps(per_source))

    # `sources` picks what trains it: OpenAssistant alone learns only its four attributes.
    alone = run(
        TrainAPMConfig.model_validate(
            values | {"sources": ["oasst"], "out": str(tmp_path / "apm-oasst"), "run_name": "oasst"}
        )
    )
    assert load_trained_attributes(tmp_path / "apm-oasst", STEERLM) == list(OASST_ATTRIBUTES)
    assert set(alone["sources"]) == {"oasst"} and alone["rows"] == per_source["oasst"]["rows"]
    with pytest.raises(ConfigError, match=r"no rows of source\(s\) \['hs2'\].*helpsteer"):
        run(TrainAPMConfig.model_validate(values | {"sources": ["hs2"], "out": str(tmp_path / "x")}))

    # Relabel the OpenAssistant turns only (the source AC-SFT will condition on the APM for):
    # every assistant turn gets the nine predictions beside its own labels; the HelpSteer rows
    # are left out and counted.
    import pyarrow.parquet as pq

    from ray_jobs.relabel import RelabelConfig
    from ray_jobs.relabel import run as run_relabel

    train = [
        r
        for f in sorted((tmp_path / "filtered" / "train").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    stats = run_relabel(
        RelabelConfig.model_validate(
            {
                "apm": str(tmp_path / "apm"),
                "data": str(tmp_path / "filtered" / "train"),
                "out": str(tmp_path / "relabelled"),
                "sources": ["oasst"],
                "tracking": tracking,
            }
        )
    )
    oasst_rows = [r for r in train if r["data_source"] == "oasst"]
    assert stats["reconciles"] and stats["output_rows"] == len(oasst_rows)
    assert stats["other_sources"] == {"helpsteer": len(train) - len(oasst_rows)}
    relabelled = [
        r
        for f in sorted((tmp_path / "relabelled").glob("part-*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    assert sorted((r["message_id"], r["turn"]) for r in relabelled) == sorted(
        (r["message_id"], r["turn"]) for r in oasst_rows
    )
    before = {r["message_id"]: r for r in oasst_rows}
    for row in relabelled:
        assert all(row[f"apm_{name}_int"] is not None for name in STEERLM.names)
        assert all(row[name] == before[row["message_id"]][name] for name in OASST_ATTRIBUTES)
