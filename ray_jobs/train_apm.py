"""Train the Attribute Prediction Model (APM) on Ray Train, then evaluate it against human labels.

    python -m ray_jobs.train_apm --config configs/train_apm.yaml [key=value ...]
    helpsteer train-apm --data runs/filtered --out runs/apm
    ray job submit --working-dir . -- python -m ray_jobs.train_apm --config configs/train_apm.yaml \
        data=/mnt/runs/filtered out=/mnt/runs/apm storage=/mnt/runs/ray_train tracking.runs_dir=/mnt/runs

`data` is the filter stage's output (train/ and validation/ Parquet). A `TorchTrainer` runs
`num_workers` data-parallel workers (DDP; gloo on CPU, NCCL on GPU). Every `checkpoint_every`
steps rank 0 writes a checkpoint (the model as a Hugging Face folder plus optimizer state) through
`ray.train.report` into `storage/<run_name>-<identity>`: the identity hashes what changes the
weights (settings but the speed-only ones and max_steps/epochs, the training split's and the
backbone's content). Re-running the same config resumes from the latest checkpoint (a larger
`max_steps` continues; fewer steps than the run has reached, by max_steps or epochs, are
refused); any other change starts a new run at step 1; `restart=true` starts over, moving the old
run aside.
Every `eval_every` steps rank 0 scores the validation split. The final model is exported to `out`,
evaluated (metrics.json, predictions.png) and registered in MLflow as `helpsteer-apm`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
from pydantic import Field
from transformers import AutoConfig

from helpsteer_core.apm import (
    APMConfig,
    AttributePredictionModel,
    collate,
    encode_pairs,
    is_decoder_config,
    load_apm_tokenizer,
    masked_mse,
    pad_token_id,
    predict,
    save_trained_attributes,
    targets_from_rows,
)
from helpsteer_core.attributes import STEERLM
from helpsteer_core.batching import batches_per_epoch, deal, epoch_batches
from helpsteer_core.config import ConfigError, StrictModel, dump_config, resolve_path
from helpsteer_core.conversation_sources import SOURCE_COLUMN, rows_of_sources
from helpsteer_core.fingerprints import folder_digest, model_fingerprint, result_settings
from helpsteer_core.metrics import attribute_metrics, label_means, plot_predictions
from helpsteer_core.model_sources import resolve_model_path
from helpsteer_core.outputs import (
    CONTINUES,
    PLACES,
    TRAINING_SPEED_ONLY,
    prepare_output,
    publish,
    training_run,
)
from helpsteer_core.readers import parquet_files, read_parquet_rows
from ray_jobs.checkpoints import checkpoint_folder, refuse_going_back, report_in_place
from ray_jobs.console import eta
from ray_jobs.deepspeed_engine import (
    DEEPSPEED_FOLDER,
    MODEL_FOLDER,
    TRAINER_STATE,
    DeepSpeedSettings,
    backward_and_step,
    build_config,
    consolidated_state_dict,
    init_engine,
    join_process_group,
    load_engine,
    save_engine,
    zero3_init,
)
from ray_jobs.runtime import ensure_ray, fit_trainer, run_as_task, stage_main
from ray_jobs.tracking import TrackingConfig, WorkerMetrics, stage_run

log = logging.getLogger("helpsteer.train_apm")
SCHEMA = STEERLM
REGISTERED_NAME = "helpsteer-apm"
OPTIMIZER_STATE = "optimizer.pt"


class TrainAPMSettings(StrictModel):
    """How to train; the pipeline profile's `apm:` section."""

    apm: APMConfig = APMConfig()
    num_workers: int = Field(2, ge=1)  # data-parallel Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)  # CPU workers use this many torch threads
    batch_size: int = Field(16, ge=1)  # rows per worker per step
    length_pool: int = Field(50, ge=1)  # global batches sorted by length together (batching.py)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = 0.01
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)  # steps between validation passes (rank 0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # worker failures survived by restarting from a checkpoint
    seed: int = 0
    # Rows of these sources (`data_source`, the filter stage's several-source runs) train and score
    # the APM; null: every row.
    sources: list[str] | None = None
    # DeepSpeed ZeRO instead of DDP (the SFT stage's settings; needed for a 13B decoder backbone).
    deepspeed: DeepSpeedSettings | None = None

    def model_post_init(self, _: Any) -> None:
        if self.deepspeed is not None:
            self.deepspeed.check_device(self.use_gpu)


class TrainAPMConfig(TrainAPMSettings):
    """The APM training stage."""

    data: str  # the filter stage's output folder
    out: str  # the trained model (Hugging Face folder); replaced when the stage succeeds
    # Ray Train runs go to storage/<run_name>-<identity hash>: the same config resumes its own run.
    run_name: str = "apm"
    restart: bool = False  # start at step 1; this identity's old run is moved aside (kept), not resumed
    storage: str = "runs/ray_train"  # Ray Train storage path (shared storage on a cluster)
    tracking: TrackingConfig = TrackingConfig()


SPLITS = ("train", "validation")


def _split_rows(data: Path, split: str, sources: list[str] | None) -> list[dict[str, Any]]:
    """One split of the filter stage's output, only the rows of `sources` when named."""
    try:
        return rows_of_sources(read_parquet_rows(data / split), sources, f"apm.sources, {data / split}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_identity(config: TrainAPMConfig) -> dict[str, Any]:
    """What the trained weights depend on (a resolved config): the settings less the speed-only
    ones and max_steps/epochs, the training split's content and the backbone's."""
    settings = result_settings(config, (*TRAINING_SPEED_ONLY, *CONTINUES, *PLACES, "apm.backbone"))
    return {
        "stage": "train_apm",
        "settings": settings,
        "data": folder_digest(Path(config.data) / "train", "*.parquet"),
        "backbone": model_fingerprint(resolve_model_path(config.apm.backbone)),
    }


def _steps(config: TrainAPMConfig, rows: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for `rows` training rows: the driver counts them before the
    workers start, and every worker the same way."""
    world = config.num_workers
    per_epoch = batches_per_epoch(rows, config.batch_size * world, config.length_pool)
    if per_epoch == 0:
        raise ConfigError(
            f"{rows} training rows do not fill one step of {config.batch_size} rows x {world} workers"
        )
    total = config.max_steps or math.ceil(config.epochs * per_epoch)
    return per_epoch, total


def _validation_rmse(
    model: AttributePredictionModel, val: dict[str, Any], device: torch.device
) -> dict[str, float]:
    pred = predict(model, model.tokenizer, val["prompts"], val["responses"], device=device)
    mask = val["mask"].numpy().astype(bool)
    err = (pred - val["targets"].numpy()) ** 2
    out = {}
    for j, name in enumerate(SCHEMA.names):
        if mask[:, j].any():
            out[f"val_rmse.{name}"] = float(np.sqrt(err[mask[:, j], j].mean()))
    out["val_rmse_mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


class _DDPTraining:
    """Plain data parallel: DDP-wrapped model, torch AdamW, rank 0 checkpoints the HF folder."""

    def __init__(self, config: TrainAPMConfig, rank: int, total: int) -> None:
        checkpoint = ray.train.get_checkpoint()
        self.start_step, optimizer_state = 0, None
        if checkpoint is None:
            self.model = AttributePredictionModel.from_backbone(config.apm, SCHEMA)
        else:
            with checkpoint.as_directory() as folder:
                self.model = AttributePredictionModel.from_pretrained(folder, SCHEMA)
                self.start_step = json.loads((Path(folder) / TRAINER_STATE).read_text())["step"]
                optimizer_state = torch.load(Path(folder) / OPTIMIZER_STATE, weights_only=True)
        self.forward = ray.train.torch.prepare_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps))
        )
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state["optimizer"])
            self.scheduler.load_state_dict(optimizer_state["scheduler"])
        self.grad_clip, self.rank = config.grad_clip, rank
        self.evaluates_on_every_rank = False

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def report(self, metrics: dict[str, float], step: int, save: bool, final: bool) -> None:
        """Every rank calls report (it is a barrier); only rank 0 hands over a checkpoint."""
        if not save or self.rank != 0:
            ray.train.report(metrics)
            return
        folder = checkpoint_folder(step)  # in the run's storage: no local staging
        self.model.save_pretrained(folder)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, folder / OPTIMIZER_STATE)
        (folder / TRAINER_STATE).write_text(json.dumps({"step": step}))
        report_in_place(metrics, folder)


class _DeepSpeedTraining:
    """DeepSpeed ZeRO (the `deepspeed:` section, shared with the SFT stage): every rank writes its
    shards into each checkpoint, and the final one also holds the consolidated model in `model/`.
    Under ZeRO-3 a 13B decoder backbone is built partitioned: no rank holds the whole model."""

    def __init__(self, config: TrainAPMConfig, rank: int, total: int) -> None:
        assert config.deepspeed is not None
        join_process_group(config.use_gpu)
        self.ds_config = build_config(
            config.deepspeed,
            micro_batch=config.batch_size,
            accumulation=1,
            world=ray.train.get_context().get_world_size(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            total_steps=total,
            schedule="constant",
            grad_clip=config.grad_clip,
            use_gpu=config.use_gpu,
        )
        self._hf_zero3 = zero3_init(self.ds_config)  # before from_pretrained; kept alive with the model
        self.model = AttributePredictionModel.from_backbone(config.apm, SCHEMA)
        self.engine = init_engine(self.model, self.ds_config)
        self.forward = self.engine
        self.start_step = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self.start_step = int(load_engine(self.engine, Path(folder) / DEEPSPEED_FOLDER)["step"])
        self.export_dtype = torch.bfloat16 if config.deepspeed.bf16(config.use_gpu) else torch.float32
        self.rank = rank
        self.evaluates_on_every_rank = True  # under ZeRO-3 every forward gathers from every rank

    def step(self, loss: torch.Tensor) -> float:
        norm = backward_and_step(self.engine, loss)
        return float("nan") if norm is None else norm

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def report(self, metrics: dict[str, float], step: int, save: bool, final: bool) -> None:
        if not save:
            ray.train.report(metrics)
            return
        folder = checkpoint_folder(step)  # every rank writes its shards here, in the run's storage
        save_engine(self.engine, folder / DEEPSPEED_FOLDER, f"step-{step}", {"step": step})
        if final:
            state = consolidated_state_dict(self.engine, self.export_dtype)  # collective
            if state is not None:
                self.model.save_pretrained(folder / MODEL_FOLDER, state_dict=state)
        if self.rank == 0:
            (folder / TRAINER_STATE).write_text(json.dumps({"step": step}))
        report_in_place(metrics, folder)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker."""
    config = TrainAPMConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed)
    train_rows, val_rows = (_split_rows(Path(config.data), split, config.sources) for split in SPLITS)

    tokenizer = load_apm_tokenizer(config.apm.backbone)
    ids = encode_pairs(
        tokenizer,
        [r["prompt"] for r in train_rows],
        [r["response"] for r in train_rows],
        config.apm,
        is_decoder_config(AutoConfig.from_pretrained(resolve_model_path(config.apm.backbone))),
    )
    targets, mask = targets_from_rows(train_rows, SCHEMA)  # (rows, n_attr) each
    lengths = [len(x) for x in ids]
    val_targets, val_mask = targets_from_rows(val_rows, SCHEMA)
    val = {
        "prompts": [r["prompt"] for r in val_rows],
        "responses": [r["response"] for r in val_rows],
        "targets": val_targets,
        "mask": val_mask,
    }
    per_epoch, total = _steps(config, len(lengths))
    training = (_DeepSpeedTraining if config.deepspeed else _DDPTraining)(config, rank, total)
    start_step, model = training.start_step, training.model
    if rank == 0:
        engine = f"DeepSpeed ZeRO-{config.deepspeed.zero_stage}" if config.deepspeed else "DDP"
        log.info(
            f"apm: {len(train_rows)} train / {len(val_rows)} validation rows; batch {config.batch_size} x "
            f"{world} workers = {config.batch_size * world} rows/step; {per_epoch} steps/epoch; "
            f"steps {start_step}..{total}; {engine}"
        )
    tracker = WorkerMetrics.for_loop(loop_config, rank, config.tracking)
    pad = pad_token_id(tokenizer)
    training.forward.train()
    window_tokens, window_seconds = 0, 0.0  # training steps only: evaluation is not counted
    batches, current_epoch = [], -1
    loop_start = time.monotonic()
    for step in range(start_step, total):
        step_start = time.perf_counter()
        epoch, index = divmod(step, per_epoch)
        if epoch != current_epoch:
            width = config.batch_size * world
            batches = epoch_batches(epoch, lengths, width, config.seed, config.length_pool)
            current_epoch = epoch
        rows = deal(batches[index], lengths, rank, world)
        batch = collate([ids[i] for i in rows], pad)
        pred = training.forward(
            batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )  # (b, n_attr)
        loss = masked_mse(pred, targets[rows].to(device), mask[rows].to(device))
        grad_norm = training.step(loss)
        window_tokens += int(batch["attention_mask"].sum()) * world
        window_seconds += time.perf_counter() - step_start
        done = step + 1
        metrics: dict[str, float] = {
            "loss": loss.item(),
            "lr": training.lr(),
            "grad_norm": grad_norm,
            "epoch": step / per_epoch,
        }
        if done % 10 == 0 or done == total:
            metrics["tokens_per_s"] = window_tokens / max(window_seconds, 1e-9)
            window_tokens, window_seconds = 0, 0.0
            if rank == 0:
                log.info(
                    f"apm step {done}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                    f"tokens/s {metrics['tokens_per_s']:.0f} {eta(loop_start, start_step, done, total)}"
                )
        evaluate = done % config.eval_every == 0 or done == total
        save = done % config.checkpoint_every == 0 or done == total
        if evaluate and (rank == 0 or training.evaluates_on_every_rank):
            metrics.update(_validation_rmse(model, val, device))
            if rank == 0:
                log.info(f"apm step {done}: validation rmse {metrics['val_rmse_mean']:.4f}")
            training.forward.train()
        tracker.log(metrics, done)
        if evaluate or save:
            training.report(metrics | {"step": done}, done, save, final=done == total)
    if start_step >= total:
        # A re-run of a finished run: hand the restored model back as the result.
        training.report({"step": total}, total, save=True, final=True)


def evaluate_apm(
    model_dir: Path,
    data: Path,
    out: Path,
    train_data: Path | None = None,
    name: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Agreement of the APM in `model_dir` with the human labels of `data` (a Parquet folder).

    Writes `out/metrics.json` and `out/predictions.png`. The baseline predicts the mean label of
    `train_data` (the training split; defaults to `data` itself). `name`: the folder the model is
    published to, when it is evaluated in its staging folder. Rows of several sources (a
    `data_source` column) are also scored per source, each against its own training rows' mean
    (`sources` in metrics.json); `sources` keeps only the rows of those. The stage runs this in a
    Ray task with its workers' resources (`run_as_task`), on a GPU in bf16 when it trains on GPUs.
    """
    rows = _split_rows(data, "", sources)
    train_rows = _split_rows(train_data, "", sources) if train_data is not None else rows
    model = AttributePredictionModel.from_pretrained(model_dir, SCHEMA, dtype=getattr(torch, dtype))
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    pred = predict(model, model.tokenizer, prompts, responses, device=device)
    metrics = _agreement(pred, rows, train_rows)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"rows": len(rows), "data": str(data), "model": str(name or model_dir)}
    report["attributes"] = metrics
    named = sorted({str(r[SOURCE_COLUMN]) for r in rows if r.get(SOURCE_COLUMN) is not None})
    if named:
        report["sources"] = {}
        for source in named:
            picked = [i for i, r in enumerate(rows) if r.get(SOURCE_COLUMN) == source]
            own = [r for r in train_rows if r.get(SOURCE_COLUMN) == source] or train_rows
            report["sources"][source] = {
                "rows": len(picked),
                "attributes": _agreement(pred[picked], [rows[i] for i in picked], own),
            }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    human, mask = (t.numpy() for t in targets_from_rows(rows, SCHEMA))
    plot_predictions(pred, human, mask, SCHEMA, out / "predictions.png")
    return report


def _agreement(
    pred: np.ndarray, rows: list[dict[str, Any]], train_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per-attribute agreement of predictions with the rows' labels; baseline: train rows' means."""
    human, mask = (t.numpy() for t in targets_from_rows(rows, SCHEMA))
    train_human, train_mask = (t.numpy() for t in targets_from_rows(train_rows, SCHEMA))
    return attribute_metrics(pred, human, mask, label_means(train_human, train_mask), SCHEMA)


def run(config: TrainAPMConfig) -> dict[str, Any]:
    data, out = resolve_path(config.data), resolve_path(config.out)
    staging = prepare_output(out, "train_apm")  # a folder this stage did not write is refused now
    for split in SPLITS:
        parquet_files(data / split, "the filter stage")  # fail before Ray starts if the data is missing
    # The rows the workers train on, read here first: a source named but absent, or too few rows
    # for one step, fails before Ray starts, and the run's steps are counted before it resumes.
    train_rows = _split_rows(data, "train", config.sources)
    if config.sources is not None:
        _split_rows(data, "validation", config.sources)
    total = _steps(config, len(train_rows))[1]
    labelled = targets_from_rows(train_rows, SCHEMA)[1].any(dim=0)  # the attributes it trains on
    trained = [name for name, seen in zip(SCHEMA.names, labelled.tolist(), strict=True) if seen]
    del train_rows  # the workers read their own; the driver keeps the count and the attributes
    storage = resolve_path(config.storage)
    resolved = config.model_copy(update={"data": str(data), "out": str(out), "storage": str(storage)})
    resolved = resolved.model_copy(
        update={"run_name": training_run(storage, config.run_name, run_identity(resolved), config.restart)}
    )
    refuse_going_back(storage / resolved.run_name, total, None if config.max_steps else config.epochs)
    ensure_ray()
    with stage_run("train_apm", resolved, config.tracking, SCHEMA) as tracked:
        result = fit_trainer(
            train_loop,
            {
                "config": resolved.model_dump(mode="json"),
                "run_id": tracked.run_id,
                "tracking_uri": config.tracking.uri(),
            },
            resolved,
            storage,
            "APM training",
        )
        with result.checkpoint.as_directory() as folder:
            if (Path(folder) / MODEL_FOLDER).is_dir():  # DeepSpeed: the consolidated export
                shutil.copytree(Path(folder) / MODEL_FOLDER, staging)
            else:  # DDP: the checkpoint is the model folder plus optimizer state
                shutil.copytree(
                    folder, staging, ignore=shutil.ignore_patterns(OPTIMIZER_STATE, TRAINER_STATE)
                )
        (staging / "train_config.yaml").write_text(dump_config(resolved))
        save_trained_attributes(staging, trained)
        report = run_as_task(
            evaluate_apm,
            staging,
            data / "validation",
            staging / "evaluation",
            data / "train",
            name=out,  # the published folder: the staging path is gone once published
            sources=config.sources,
            num_cpus=config.cpus_per_worker,
            num_gpus=1 if config.use_gpu else 0,
            pass_device=True,
        )
        publish(staging, out, "train_apm")
        summary = {
            name: {k: m[k] for k in ("pearson", "rmse", "baseline_rmse", "qwk")}
            for name, m in report["attributes"].items()
        }
        tracked.log_metrics({f"eval.{k}": v for k, v in _numeric(report["attributes"]).items()})
        tracked.log_outputs({"model": out})
        tracked.register_folder(REGISTERED_NAME, out, "HelpSteer attribute prediction model", SCHEMA.id)
    log.info("apm: saved to %s; validation agreement: %s", out, json.dumps(summary))
    return report


def _numeric(metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        f"{a}.{k}": float(v)
        for a, m in metrics.items()
        for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.train_apm", TrainAPMConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
