"""The GPU check: each step of ours that needs a GPU, pass / fail / skipped, with its throughput.

    python bench/gpu_check.py [--out DIR] [--device cuda|cpu] [--quick]

Run it whenever a GPU machine is lent (the `device` tool: one call, well under 8 minutes on one
GPU; it needs torch with CUDA, transformers and this checkout, and runs the steps whose packages
are present: carry the wheels of deepspeed, and vllm if wanted). Steps, on the packaged models so
nothing is downloaded:

- `cuda`: the device, its compute capability and bf16 support.
- `generation`: SmolLM2-135M-Instruct in bf16 (`load_generator`, device_map auto, as the Serve
  replicas and the evaluation actors load it), 16 prompts x 128 new tokens: new tokens/s.
- `apm`: the APM on the packaged MiniLM in bf16 on the device (`apm.predict`, as relabel and the
  APM deployment run it), 1,024 synthetic rows: rows/s.
- `sft_deepspeed`: AC-SFT steps of SmolLM2 under DeepSpeed bf16 ZeRO-1 on one GPU (NCCL), the
  training stage's step (`bench/sft_engine.time_layout`): tokens/s. Skipped without deepspeed.
- `sft_lora`: the same steps with LoRA adapters (r 16, every linear layer) under bf16 ZeRO-2 and
  ZeRO-3 (fp32 on a CPU): tokens/s of each. Skipped without deepspeed.
- `vllm`: the same generation through vLLM, when it is installed. Skipped without it.

Prints a table and writes `gpu_check.json` to `--out`. `--device cpu --quick` runs the same code
on a CPU at small sizes (the test suite does, so the script is known to run before a GPU is lent).
The tests never need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


class Skipped(Exception):
    """A step that cannot run here (no GPU asked for, a package not installed): not a failure."""


def _need(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise Skipped(f"{package} is not installed")


QUESTIONS = [
    "Why is the sky blue?",
    "How do tides work?",
    "What is a prime number?",
    "Explain photosynthesis.",
]


def check_cuda(device: str, quick: bool) -> tuple[str, str]:
    import torch

    if device == "cpu":
        raise Skipped("--device cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    major, minor = torch.cuda.get_device_capability()
    bf16 = torch.cuda.is_bf16_supported()
    return "", f"{torch.cuda.get_device_name()} (sm_{major}{minor}), bf16 {bf16}, torch {torch.__version__}"


def check_generation(device: str, quick: bool) -> tuple[str, str]:
    import torch

    from helpsteer_core.generator import SMOLLM2, load_generator

    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model, tokenizer = load_generator(SMOLLM2, dtype, "auto" if on_gpu else None)
    prompts, new_tokens = (QUESTIONS * 4)[: 4 if quick else 16], 16 if quick else 128
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in prompts
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    model.generate(**batch, max_new_tokens=2, do_sample=False)  # warm-up
    _sync(on_gpu)
    started = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(on_gpu)
    seconds = time.perf_counter() - started
    made = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return f"{made / seconds:.0f} new tokens/s", f"{len(prompts)} prompts x {new_tokens} tokens, {dtype}"


def check_apm(device: str, quick: bool) -> tuple[str, str]:
    import torch

    from helpsteer_core.apm import APMConfig, AttributePredictionModel, load_apm_tokenizer, predict
    from helpsteer_core.synthetic import generate

    model = AttributePredictionModel.from_backbone(APMConfig())
    if device == "cuda":
        model = model.to(torch.bfloat16)
    tokenizer = load_apm_tokenizer(APMConfig().backbone)
    rows = generate(64 if quick else 1024, 1)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    predict(model, tokenizer, prompts[:8], responses[:8], device=device)  # warm-up
    _sync(device == "cuda")
    started = time.perf_counter()
    out = predict(model, tokenizer, prompts, responses, device=device)
    _sync(device == "cuda")
    seconds = time.perf_counter() - started
    if not (out == out).all():
        raise RuntimeError("NaN predictions")
    return (
        f"{len(rows) / seconds:.0f} rows/s",
        f"{len(rows)} synthetic rows, {next(model.parameters()).dtype}",
    )


def _sft_setup(device: str, quick: bool) -> tuple[bool, int, list, Any]:
    """What both AC-SFT steps need: the device, the step count, the examples, the process group."""
    _need("deepspeed")
    from sft import synthetic_examples  # bench/sft.py

    use_gpu = device == "cuda"
    _one_process_group(use_gpu)
    steps = 3 if quick else 12
    examples, tokenizer = synthetic_examples(8 * steps + 8, 1)
    return use_gpu, steps, examples, tokenizer


def check_sft_deepspeed(device: str, quick: bool) -> tuple[str, str]:
    from sft_engine import LAYOUTS, time_layout  # bench/sft_engine.py

    use_gpu, steps, examples, tokenizer = _sft_setup(device, quick)
    layout = LAYOUTS["bf16 ZeRO-1, trained-position logits"]
    if not use_gpu:
        layout = LAYOUTS["fp32 ZeRO-0"]  # bf16 on a CPU without bf16 instructions is refused
    rate = time_layout(layout, examples, tokenizer, steps, use_gpu=use_gpu)
    return (
        f"{rate:.0f} tokens/s",
        f"{steps} steps of 8 rows, {layout['precision']} ZeRO-{layout['zero_stage']}",
    )


def check_sft_lora(device: str, quick: bool) -> tuple[str, str]:
    from sft_engine import LAYOUTS, time_layout  # bench/sft_engine.py

    use_gpu, steps, examples, tokenizer = _sft_setup(device, quick)
    rates = []
    for stage in (2, 3):
        layout = LAYOUTS[f"bf16 ZeRO-{stage}, LoRA r 16"]
        if not use_gpu:
            layout = layout | {"precision": "fp32"}
        rates.append(time_layout(layout, examples, tokenizer, steps, use_gpu=use_gpu))
    return (
        f"{rates[0]:.0f} / {rates[1]:.0f} tokens/s",
        f"ZeRO-2 / ZeRO-3, LoRA r 16, {steps} steps of 8 rows, {layout['precision']}",
    )


def check_vllm(device: str, quick: bool) -> tuple[str, str]:
    _need("vllm")
    if device != "cuda":
        raise Skipped("vLLM needs a GPU")
    from vllm import LLM, SamplingParams

    from helpsteer_core.generator import cached_smollm2

    llm = LLM(model=str(cached_smollm2()), dtype="bfloat16", gpu_memory_utilization=0.3)
    prompts = (QUESTIONS * 4)[:16]
    params = SamplingParams(max_tokens=128, min_tokens=128, temperature=0)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    made = sum(len(o.outputs[0].token_ids) for o in outputs)
    return f"{made / seconds:.0f} new tokens/s", "16 prompts x 128 tokens, bf16"


STEPS: dict[str, Callable[[str, bool], tuple[str, str]]] = {
    "cuda": check_cuda,
    "generation": check_generation,
    "apm": check_apm,
    "sft_deepspeed": check_sft_deepspeed,
    "sft_lora": check_sft_lora,
    "vllm": check_vllm,
}


def _one_process_group(use_gpu: bool) -> None:
    """A one-process group (NCCL on the GPU), as a stage's single Ray Train worker joins; once."""
    import torch.distributed as dist

    from ray_jobs.deepspeed_engine import join_process_group

    if not dist.is_initialized():
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", "29541")
        join_process_group(use_gpu)


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        import torch

        torch.cuda.synchronize()


def run_steps(device: str, quick: bool) -> list[dict[str, Any]]:
    results = []
    for name, step in STEPS.items():
        started = time.perf_counter()
        try:
            figure, detail = step(device, quick)
            status = "pass"
        except Skipped as skip:
            status, figure, detail = "skipped", "", str(skip)
        except Exception as exc:  # noqa: BLE001 - every step reports; one failure does not stop the rest
            status, figure = "fail", ""
            detail = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds = time.perf_counter() - started
        results.append(
            {"step": name, "status": status, "figure": figure, "detail": detail, "seconds": round(seconds, 1)}
        )
        print(f"{name:<14} {status:<8} {figure:<22} {seconds:6.1f} s  {detail}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    print(f"{'step':<14} {'status':<8} {'figure':<22} {'time':>8}  detail")
    results = run_steps(args.device, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(
        json.dumps({"device": args.device, "steps": results}, indent=2) + "\n"
    )
    failed = [r["step"] for r in results if r["status"] == "fail"]
    print(
        f"{len(results) - len(failed)} of {len(results)} steps did not fail"
        + (f"; failed: {failed}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
