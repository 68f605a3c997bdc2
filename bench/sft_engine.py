"""Benchmark: the AC-SFT training step's engine alone, per precision and layout, in one run.

    .venv/bin/python bench/sft_engine.py [--steps 6] [--rows 200] [--threads 2]

No Ray: one process steps a DeepSpeed engine on the packaged SmolLM2-135M-Instruct the way
`ray_jobs.train_sft` does (the same examples, chat template, 8-row steps of micro-batches of 2
grouped by length, the same loss and `backward_and_step`, the model in train mode), so the
figures show what the engine costs without the stage around it. Layouts, each against the first
(the previous local profile) as a ratio:

- fp32, ZeRO-0
- bf16, ZeRO-1 (DeepSpeed's BF16_Optimizer: fp32 master weights and gradient sums)
- bf16, ZeRO-1, logits only at trained positions (`logits_to_keep`): the local profile
- the same with only the top 15 decoder layers trained (`trainable_layers: 15`)
- LoRA (`sft.lora: {r: 16}` on every linear layer) under bf16 ZeRO-2 and ZeRO-3 (the 70B LoRA
  profile's stage); not in the default run, the GPU check (`bench/gpu_check.py`) times them

Tokens are input tokens without padding; the first step of each layout is not timed. With
`--ray` the same layouts are timed again inside a Ray task on a local cluster (the process setting
a stage's Ray Train worker runs in), as ratios to the plain process's first layout.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BF16 = {"precision": "bf16", "zero_stage": 1}
LAYOUTS: dict[str, dict[str, Any]] = {
    "fp32 ZeRO-0": {"precision": "fp32", "zero_stage": 0, "keep": False, "layers": None},
    "bf16 ZeRO-1": BF16 | {"keep": False, "layers": None},
    "bf16 ZeRO-1, trained-position logits": BF16 | {"keep": True, "layers": None},
    "... and trainable_layers 15": BF16 | {"keep": True, "layers": 15},
    "bf16 ZeRO-2, LoRA r 16": {
        "precision": "bf16",
        "zero_stage": 2,
        "keep": True,
        "layers": None,
        "lora": 16,
    },
    "bf16 ZeRO-3, LoRA r 16": {
        "precision": "bf16",
        "zero_stage": 3,
        "keep": True,
        "layers": None,
        "lora": 16,
    },
}
DEFAULT_LAYOUTS = [name for name, layout in LAYOUTS.items() if not layout.get("lora")]


def time_layout(
    layout: dict[str, Any], examples: list, tokenizer: Any, steps: int, use_gpu: bool = False
) -> float:
    """Tokens/s over steps 2..`steps` of one layout (on the GPU with `use_gpu`: bench/gpu_check.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpsteer_core.generator import cached_smollm2, train_top_layers
    from helpsteer_core.sft_data import collate_sft, token_loss_sum, trained_mask
    from ray_jobs.deepspeed_engine import DeepSpeedSettings, backward_and_step, build_config, init_engine

    settings = DeepSpeedSettings(zero_stage=layout["zero_stage"], precision=layout["precision"])
    config = build_config(
        settings,
        micro_batch=2,
        accumulation=4,
        world=1,
        lr=2e-4,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=steps,
        schedule="constant",
        grad_clip=1.0,
        use_gpu=use_gpu,
    )
    dtype = torch.bfloat16 if settings.bf16(use_gpu) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cached_smollm2(), dtype=dtype)
    model.config.use_cache = False
    if layout.get("lora"):
        from helpsteer_core.lora import LoRASettings, apply_lora

        model = apply_lora(
            model, LoRASettings(r=layout["lora"], alpha=2.0 * layout["lora"]), layout["layers"]
        )
    elif layout["layers"]:
        train_top_layers(model, layout["layers"])
    engine = init_engine(model, config)
    engine.train()
    tokens, seconds = 0, 0.0
    for step in range(steps):
        rows = sorted(examples[step * 8 : step * 8 + 8], key=lambda e: len(e["input_ids"]))
        started, step_tokens = time.perf_counter(), 0
        for micro in (rows[i : i + 2] for i in range(0, 8, 2)):
            batch = collate_sft(micro, tokenizer.pad_token_id)
            extra = {"logits_to_keep": trained_mask(batch["labels"])} if layout["keep"] else {}
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            extra = {k: v.to(engine.device) for k, v in extra.items()}
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = engine(**inputs, **extra).logits
            backward_and_step(engine, token_loss_sum(logits, batch["labels"]) / 600.0)
            step_tokens += int(batch["attention_mask"].sum())
        if use_gpu:
            torch.cuda.synchronize()
        if step > 0:
            tokens, seconds = tokens + step_tokens, seconds + time.perf_counter() - started
    return tokens / seconds


def run_layouts(names: list[str], steps: int, rows: int, threads: int, port: int) -> list[float]:
    """Tokens/s of each named layout, in this process (a plain one, or a Ray worker)."""
    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    os.environ.update(single | {"MASTER_PORT": str(port)})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    torch.set_num_threads(threads)
    deepspeed.init_distributed(dist_backend="gloo")
    from sft import synthetic_examples  # bench/sft.py, beside this script

    examples, tokenizer = synthetic_examples(rows, 1)
    random.Random(0).shuffle(examples)
    if len(examples) < 8 * steps:
        raise SystemExit(f"--rows {rows}: {len(examples)} examples, need {8 * steps}")
    return [time_layout(LAYOUTS[name], examples, tokenizer, steps) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--layout",
        action="append",
        choices=list(LAYOUTS),
        help="time only these (repeatable); default: all but LoRA",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="also time the layouts inside a Ray task on a local cluster (the stage's process setting)",
    )
    args = parser.parse_args()
    names = args.layout or DEFAULT_LAYOUTS
    print(f"SmolLM2-135M, 8-row steps (micro 2 x accumulation 4), {args.steps} steps, {args.threads} threads")
    rates = {"process": run_layouts(names, args.steps, args.rows, args.threads, 29531)}
    if args.ray:
        import ray

        ray.init(address="local", num_cpus=args.threads, include_dashboard=False)
        task = ray.remote(num_cpus=args.threads)(run_layouts)
        rates["Ray task"] = ray.get(task.remote(names, args.steps, args.rows, args.threads, 29532))
        ray.shutdown()
    base = rates["process"][0]
    for where, figures in rates.items():
        for name, rate in zip(names, figures, strict=True):
            print(f"{where:<9} {name:<40} {rate:7.1f} tokens/s  {rate / base:.2f}x")


if __name__ == "__main__":
    main()
