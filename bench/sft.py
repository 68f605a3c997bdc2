"""Benchmark: tokens/s of our AC-SFT training step against TRL's SFTTrainer, one run.

    .venv/bin/python bench/sft.py [--steps 16] [--rows 600] [--precision fp32 bf16]

Same model (the packaged SmolLM2-135M-Instruct), same examples (synthetic rows through
`helpsteer_core.sft_data`, chat template, max_length 384, identical input ids and loss masks),
same batch (micro-batch 4 x accumulation 2 = 8 rows per optimizer step), same optimizer (AdamW,
lr 1e-4), same machine, and the same thread count (2). TRL is used as users would: `SFTTrainer`
on pre-tokenized examples with `labels`, twice: with its default random batch order, and at its
best on this CPU, length-grouped batches (`train_sampling_strategy="group_by_length"`, which
transformers 5 spells so; TRL's padding-free collator is left out: it refuses a custom collator,
and the token count per step comes from one).
Ours: `python -m ray_jobs.train_sft` with the local profile's engine (1 Ray Train worker x 2
threads; DeepSpeed ZeRO-0 in fp32, ZeRO-1 in bf16, the layout the stage allows for bf16 on CPU),
on its random batches (micro-batches grouped by length within a step). Both count input tokens without
padding, over the steps after the first `--warmup` ones (model loading and Ray start-up are not
counted). Printed per precision: tokens/s of each, the ratio, and, on a GPU, model-FLOPs
utilisation (6 x parameters x tokens/s over the GPU's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MICRO, ACCUMULATION, MAX_LENGTH, LR = 4, 2, 384, 1e-4
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # bf16 dense


def synthetic_examples(rows: int, seed: int) -> tuple[list[dict[str, list[int]]], Any]:
    """(examples, tokenizer): `rows` synthetic rows in the packaged SmolLM2's chat template."""
    from helpsteer_core.generator import SMOLLM2, load_generator_tokenizer
    from helpsteer_core.sft_data import SFTDataConfig, examples_from_rows
    from helpsteer_core.synthetic import generate

    tokenizer = load_generator_tokenizer(SMOLLM2)
    config = SFTDataConfig(template="chat", max_length=MAX_LENGTH)
    return examples_from_rows(generate(rows, seed), tokenizer, config), tokenizer


def trl_baseline(
    rows: int, seed: int, steps: int, warmup: int, precision: str, order: str, out: Path
) -> None:
    """TRL's SFTTrainer in this process (its own process, so threads and memory are its own)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from helpsteer_core.generator import cached_smollm2

    torch.set_num_threads(2)
    examples, tokenizer = synthetic_examples(rows, seed)
    model = AutoModelForCausalLM.from_pretrained(cached_smollm2(), dtype=torch.float32)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    counted: list[int] = []
    slots: list[int] = []  # the padded batch's size

    def counting_collator(batch: list[dict]) -> dict:
        counted.append(sum(len(e["input_ids"]) for e in batch))
        slots.append(len(batch) * max(len(e["input_ids"]) for e in batch))
        return collate(batch)

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            ends.append(time.perf_counter())

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "trl"),
            per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=ACCUMULATION,
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_length=MAX_LENGTH,
            bf16=precision == "bf16",
            use_cpu=not torch.cuda.is_available(),
            logging_steps=steps,
            save_strategy="no",
            report_to=[],
            seed=seed,
            dataloader_num_workers=0,
            train_sampling_strategy=order,
        ),
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        data_collator=counting_collator,
        callbacks=[StepTimes()],
    )
    trainer.train()
    per_step = [sum(counted[i * ACCUMULATION : (i + 1) * ACCUMULATION]) for i in range(len(ends))]
    tokens = sum(per_step[warmup:])
    seconds = ends[-1] - ends[warmup - 1]
    padding = 1 - sum(counted) / sum(slots)
    (out / f"trl-{precision}-{order}.json").write_text(
        json.dumps({"tokens": tokens, "seconds": seconds, "padding": padding})
    )


def ours(work: Path, rows: int, seed: int, steps: int, warmup: int, precision: str) -> dict[str, float]:
    """The training stage as users run it; tokens and tokens/s per step come from its MLflow run."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpsteer_core.synthetic import generate
    from ray_jobs.tracking import TrackingConfig, runs_for

    data = work / "rows"
    if not data.exists():
        data.mkdir()
        pq.write_table(pa.Table.from_pylist(generate(rows, seed)), data / "rows.parquet")
    runs = work / f"runs-{precision}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.train_sft",
            "--config",
            str(REPO / "configs" / "train_sft.yaml"),
            f"data={data}",
            "validation=null",
            f"out={work / f'sft-{precision}'}",
            f"storage={work / 'ray_train'}",
            f"run_name=bench-{precision}",
            "restart=true",  # measure a fresh run: speed-only settings share an identity, so would resume
            f"tracking.runs_dir={runs}",
            f"max_steps={steps}",
            f"checkpoint_every={steps}",
            "num_workers=1",
            "cpus_per_worker=2",
            f"deepspeed.zero_stage={1 if precision == 'bf16' else 0}",
            f"deepspeed.precision={precision}",
            f"micro_batch_size={MICRO}",
            f"accumulation_steps={ACCUMULATION}",
            f"examples.max_length={MAX_LENGTH}",
            f"lr={LR}",
            "warmup_steps=0",
        ],
        check=True,
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "local"},  # its own Ray instance, never a running cluster
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tracking = TrackingConfig(runs_dir=str(runs))
    run_id = runs_for(tracking, "train_sft")[0].info.run_id
    client = mlflow.MlflowClient(tracking.uri())
    tokens = {m.step: m.value for m in client.get_metric_history(run_id, "tokens")}
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "tokens_per_s")}
    kept = [s for s in sorted(tokens) if s > warmup]
    return {"tokens": sum(tokens[s] for s in kept), "seconds": sum(tokens[s] / rates[s] for s in kept)}


def _mfu(tokens_per_s: float) -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        return f" (MFU: unknown peak for {name})"
    flops = 6 * 134.5e6 * tokens_per_s  # SmolLM2-135M: 134.5M parameters
    return f" MFU {100 * flops / (peak * 1e12):.2f}% of {name}'s {peak:.0f} TFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    # bf16 on CPU needs bf16 instructions (AVX512-BF16 or AMX) to be faster than fp32.
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument(
        "--trl-order",
        nargs="+",
        choices=["random", "group_by_length"],
        default=["random", "group_by_length"],
        help="TRL's batch orders to run (its default, and length-grouped: its best here)",
    )
    parser.add_argument("--trl-only", nargs=3, metavar=("PRECISION", "ORDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_only:
        precision, order, out = args.trl_only
        trl_baseline(args.rows, args.seed, args.steps, args.warmup, precision, order, Path(out))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    print(
        f"SmolLM2-135M, {args.rows} synthetic rows, max_length {MAX_LENGTH}, micro {MICRO} x accumulation "
        f"{ACCUMULATION}, {args.steps} steps (first {args.warmup} not timed), 2 threads"
    )
    summary = []
    for precision in args.precision:
        baselines = {}
        for order in args.trl_order:
            subprocess.run(
                [sys.executable, __file__, *_common(args), "--trl-only", precision, order, str(work)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            baselines[order] = json.loads((work / f"trl-{precision}-{order}.json").read_text())
        mine = ours(work, args.rows, args.seed, args.steps, args.warmup, precision)
        our_rate = mine["tokens"] / mine["seconds"]
        row: dict[str, Any] = {"precision": precision, "ours": round(our_rate, 1)}
        for order, base in baselines.items():
            base_rate = base["tokens"] / base["seconds"]
            print(
                f"{precision}: TRL SFTTrainer ({order}, {100 * base['padding']:.0f}% padding) "
                f"{base_rate:7.1f} tokens/s{_mfu(base_rate)}"
            )
            row[f"trl_{order}"] = round(base_rate, 1)
            row[f"ratio_vs_{order}"] = round(our_rate / base_rate, 3)
        print(f"{precision}: ray_jobs.train_sft {our_rate:7.1f} tokens/s{_mfu(our_rate)}")
        for order in baselines:
            print(f"{precision}: ratio (ours / TRL {order}) {row[f'ratio_vs_{order}']:.2f}x")
        summary.append(row)
    print(json.dumps(summary))


def _common(args: argparse.Namespace) -> list[str]:
    values = {"--steps": args.steps, "--warmup": args.warmup, "--rows": args.rows, "--seed": args.seed}
    return [str(x) for pair in values.items() for x in pair]


if __name__ == "__main__":
    main()
