"""Is a small model's step on a GPU bound by the host (kernel launches) or by the GPU? One run.

    python bench/gpu_batch_scaling.py [--model FOLDER]   # on the GPU machine, after bench/gpu_check.py

SmolLM2-135M's architecture (its config from `--model`, default the folder `cached_smollm2` made;
the weights are random, which changes no timing) in bf16: greedy generation of 128 new tokens at
batch 16, 64 and 256, and a plain AdamW training step at micro-batches 2 x 128, 16 x 512 and
64 x 512 tokens, then the cost of one tiny kernel. A time per step that stays flat while the batch
grows means the host sets the pace, so tokens/s at the GPU check's small sizes say little about
the GPU. Results are in docs/results.md ("The GPU check on one H200").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpsteer_core.generator import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=default_cache_dir(), help="a folder with config.json")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.bfloat16)
    model = model.cuda().eval()
    vocab = model.config.vocab_size
    for batch in (16, 64, 256):
        ids = torch.randint(0, vocab, (batch, 40), device="cuda")
        mask = torch.ones_like(ids)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(
            f"generate batch {batch}: {batch * 128 / seconds:.0f} new tokens/s,"
            f" {seconds / 128 * 1000:.1f} ms a step"
        )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for batch, length in ((2, 128), (16, 512), (64, 512)):
        ids = torch.randint(0, vocab, (batch, length), device="cuda")
        for step in range(8):  # 3 warm-up steps, 5 timed
            if step == 3:
                torch.cuda.synchronize()
                started = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 5
        print(
            f"train micro-batch {batch}x{length}: {batch * length / seconds:.0f} tokens/s,"
            f" {seconds * 1000:.1f} ms a step"
        )
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10_000):
        x = x + 1
    torch.cuda.synchronize()
    print(f"one tiny kernel: {(time.perf_counter() - started) / 10_000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
