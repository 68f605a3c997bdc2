"""DeepSpeed for the training stages: one typed settings block, the config it becomes, the engine.

Shared by AC-SFT (`ray_jobs.train_sft`) and the APM (`ray_jobs.train_apm`, when its `deepspeed:`
section is set), so both read the same YAML keys:

    deepspeed:
      zero_stage: 3              # 0 = plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters
      offload_optimizer: false   # optimizer states and step in CPU RAM (DeepSpeedCPUAdam)
      offload_params: false      # ZeRO-3 parameters in CPU RAM between uses
      precision: auto            # auto: bf16 on GPU, fp32 on CPU; bf16 on CPU needs zero_stage 1
      gradient_checkpointing: false

Inside a Ray Train worker, torch.distributed is already set up by `TorchTrainer` (gloo on CPU,
NCCL on GPU); `deepspeed.initialize` joins that process group. On CPU DeepSpeed picks its CPU
accelerator by itself (DS_ACCELERATOR=cpu is set anyway, before the first import). With no
offload the optimizer is torch's AdamW on CPU (`torch_adam`, nothing to compile) and DeepSpeed's
FusedAdam on GPU; with offload it is DeepSpeedCPUAdam, whose C++ op compiles once (about 100 s
here) into the torch extensions cache.

Under ZeRO-3, `zero3_init` must run before `from_pretrained`: transformers then builds the model
already partitioned, so no rank ever holds the whole model (a 70B model is 280 GB in fp32).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from helpsteer_core.config import ConfigError, StrictModel

Precision = Literal["auto", "bf16", "fp32"]
# One checkpoint's layout, shared by the training stages: DeepSpeed's shards, the exported
# Hugging Face folder (final checkpoint), and the step reached.
DEEPSPEED_FOLDER = "deepspeed"
MODEL_FOLDER = "model"
TRAINER_STATE = "trainer_state.json"


class DeepSpeedSettings(StrictModel):
    """DeepSpeed ZeRO settings (the `deepspeed:` section of the SFT and APM stage configs)."""

    zero_stage: int = Field(3, ge=0, le=3)  # 0 none, 1 optimizer states, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # optimizer states and step in CPU RAM (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3 only: parameters in CPU RAM between uses
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower

    def model_post_init(self, _: Any) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"deepspeed.offload_params needs zero_stage 3, not {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3, not 0")

    def bf16(self, use_gpu: bool) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and use_gpu)

    def check_device(self, use_gpu: bool) -> None:
        """bf16 on CPU only with ZeRO-1, the one layout measured to train there (docs/results.md).

        With ZeRO-1, `build_config` asks for fp32 gradient accumulation, so DeepSpeed picks its
        BF16_Optimizer: fp32 master weights, gradients summed in fp32 over micro-batches. ZeRO-0 bf16
        is its FP16_UnfusedOptimizer, which sums micro-batch gradients in bf16; ZeRO-2/3 keep bf16
        gradient buckets. Neither has been measured on CPU, where a wrong update shows only as a model
        that trains to a worse loss, so they are refused rather than run unverified.
        """
        if self.precision == "bf16" and not use_gpu and self.zero_stage != 1:
            raise ConfigError(
                f"deepspeed.precision: bf16 on CPU (use_gpu: false) needs deepspeed.zero_stage: 1 "
                f"(fp32 master weights and gradient accumulation), not {self.zero_stage}; "
                f"or set deepspeed.precision: auto or fp32"
            )


def build_config(
    settings: DeepSpeedSettings,
    *,
    micro_batch: int,
    accumulation: int,
    world: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["constant", "cosine"],
    grad_clip: float,
    use_gpu: bool,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for these settings (saved beside every SFT output)."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.zero_stage == 3:
        # Consolidated weights for the exported Hugging Face folder (`consolidated_state_dict`).
        zero |= {"stage3_gather_16bit_weights_on_model_save": True}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    optimizer_params: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.95]}
    if not use_gpu and not settings.offload_optimizer:
        optimizer_params["torch_adam"] = True  # FusedAdam is GPU-only; its CPU build needs a compile
    scheduler: dict[str, Any] | None = None  # constant, no warmup: the optimizer's own lr
    if schedule == "constant" and warmup_steps > 0:
        scheduler = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",
            },
        }
    elif schedule == "cosine":
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
            },
        }
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.bf16(use_gpu)},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 10**9,  # the stages print their own per-step line
        "wall_clock_breakdown": False,
    }
    if settings.bf16(use_gpu) and settings.zero_stage == 1:
        # BF16_Optimizer: micro-batch gradients summed in fp32, not bf16 (`check_device`).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config | ({"scheduler": scheduler} if scheduler else {})


def join_process_group(use_gpu: bool) -> None:
    """In a Ray Train worker, before any model is built: pick DeepSpeed's accelerator (before its
    first import) and hand it the process group `TorchTrainer` set up, so that ZeRO-3's
    partitioned `from_pretrained` sees every rank (otherwise it assumes a world of one)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def zero3_init(ds_config: dict[str, Any]) -> Any:
    """Under ZeRO-3, the `HfDeepSpeedConfig` that makes `from_pretrained` build a partitioned
    model; keep the returned object alive while the model exists. None for stages 0-2."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def init_engine(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """`deepspeed.initialize` over the trainable parameters; returns the engine."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    return engine


def backward_and_step(engine: Any, loss: torch.Tensor) -> float | None:
    """`engine.backward(loss)` then `engine.step()`; at an accumulation boundary, the gradient norm.

    The norm is taken before clipping, over the whole model: DeepSpeed's own for ZeRO 1-3 (it
    keeps it after the step); for ZeRO-0, where it keeps none, from the gradients themselves,
    which are whole and averaged over workers once the boundary's backward returns.
    """
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    norm: float | None = None
    if boundary and engine.zero_optimization_stage() == 0:
        with torch.no_grad():
            norms = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else float("nan")
    engine.step()
    if boundary and norm is None:
        kept = engine.get_global_grad_norm()
        norm = float("nan") if kept is None else float(kept)
    return norm


def save_engine(
    engine: Any, folder: Path, tag: str, client_state: dict[str, Any], trainable_only: bool = False
) -> None:
    """DeepSpeed's own checkpoint (every rank writes its shards of model and optimizer).

    `trainable_only` leaves the frozen parameters out (LoRA: the base model, which the run
    rebuilds from the generator it was started from, is not written at every checkpoint)."""
    engine.save_checkpoint(
        str(folder), tag=tag, client_state=client_state, exclude_frozen_parameters=trainable_only
    )


def load_engine(engine: Any, folder: Path, trainable_only: bool = False) -> dict[str, Any]:
    """Restore model, optimizer and scheduler from the latest tag in `folder`; the client state.

    `trainable_only`: a checkpoint `save_engine` wrote without the frozen parameters, which keep
    the values the engine was built with. The module is then loaded non-strictly; that a
    checkpoint holds this very model's trainable parameters is the run identity's guarantee (a
    LoRA run never resumes a full-model run's checkpoint, nor one of other adapters).
    DeepSpeed reads its files with `torch.load(weights_only=False)`: load only checkpoints this
    project wrote to storage you control, never ones from elsewhere.
    """
    path, client_state = engine.load_checkpoint(str(folder), load_module_strict=not trainable_only)
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (no 'latest' tag file)")
    return dict(client_state or {})


def consolidated_state_dict(engine: Any, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The whole model's weights in `dtype` on rank 0 (None elsewhere). Collective: every rank calls.

    ZeRO-3 gathers one layer at a time, so rank 0 needs CPU RAM for the consolidated weights but
    no device ever holds the whole model.
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if engine.global_rank == 0 else None
    if state is None:
        return None
    return {name: tensor.detach().to("cpu", dtype) for name, tensor in state.items()}


__all__ = [
    "DEEPSPEED_FOLDER",
    "MODEL_FOLDER",
    "TRAINER_STATE",
    "DeepSpeedSettings",
    "build_config",
    "consolidated_state_dict",
    "init_engine",
    "load_engine",
    "save_engine",
    "join_process_group",
    "zero3_init",
]
