"""Benchmark: the relabel stage against the loop a user would write, same model and rows, one run.

    .venv/bin/python bench/relabel.py [--rows 2000] [--apm runs/apm]

Baselines: one process, `AutoModel` + the APM head, a fixed batch of 32 rows padded to the longest
row of the batch (the Hugging Face tokenizer's `padding="longest"`), twice: rows in input order,
and rows sorted by length first (the best a user would write by hand: little padding), the
predictions put back in input order.
Ours: `ray_jobs.relabel` on a local Ray (2 actors, length-sorted token-budget batches). Both
times include loading the model; Ray's own start-up is not counted. Prints rows/s of each, the
ratio, peak memory, and the largest difference between the two sets of predictions (same model,
so it must be ~0). Without --apm an untrained APM on the packaged MiniLM is used: speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def baseline(apm: Path, data: Path, batch_size: int, order: str, out: Path) -> None:
    """Runs in its own process, so its peak memory is its own."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(apm)
    model = AutoModel.from_pretrained(apm).eval()
    head = load_file(str(apm / "head.safetensors"))
    weight, bias = head["weight"], head["bias"]
    max_length = json.loads((apm / "apm_config.json").read_text())["max_length"]
    rows = [r for f in sorted(data.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    positions = list(range(len(rows)))
    if order == "sorted":
        positions.sort(key=lambda i: len(rows[i]["prompt"]) + len(rows[i]["response"]))
    rows = [rows[i] for i in positions]
    preds = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            enc = tokenizer(
                [r["prompt"] for r in batch],
                [r["response"] for r in batch],
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            hidden = model(**enc).last_hidden_state  # (batch, seq, hidden)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            preds.append((pooled @ weight.T + bias).numpy())
    seconds = time.perf_counter() - started
    in_order = np.empty_like(np.concatenate(preds))
    in_order[positions] = np.concatenate(preds)
    np.save(out / f"baseline-{order}.npy", in_order)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"baseline-{order}.json").write_text(
        json.dumps({"rows": len(rows), "seconds": seconds, "peak_rss_mb": peak})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--apm", type=Path, help="a trained APM folder (default: untrained, packaged MiniLM)")
    parser.add_argument("--batch-size", type=int, default=32, help="the baseline's fixed batch size")
    parser.add_argument("--baseline-only", nargs=3, metavar=("DATA", "ORDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_only:
        data_dir, order, out_dir = args.baseline_only
        baseline(args.apm, Path(data_dir), args.batch_size, order, Path(out_dir))
        return

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from helpsteer_core.apm import APMConfig, AttributePredictionModel
    from helpsteer_core.synthetic import generate
    from ray_jobs.relabel import RelabelConfig, run

    work = Path(tempfile.mkdtemp(prefix="bench-relabel-"))
    apm = args.apm
    if apm is None:
        apm = work / "apm"
        AttributePredictionModel.from_backbone(APMConfig()).save_pretrained(apm)
    data = work / "data"
    data.mkdir()
    rows = generate(args.rows, args.seed)
    pq.write_table(pa.Table.from_pylist(rows), data / "rows.parquet")
    lengths = [len(r["prompt"]) + len(r["response"]) for r in rows]
    print(f"{len(rows)} rows, characters per row: median {int(np.median(lengths))}, max {max(lengths)}")

    bases = {}
    for order in ("input", "sorted"):
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--apm",
                str(apm),
                "--batch-size",
                str(args.batch_size),
                "--baseline-only",
                str(data),
                order,
                str(work),
            ],
            check=True,
        )
        bases[order] = json.loads((work / f"baseline-{order}.json").read_text())

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    stats = run(
        RelabelConfig.model_validate(
            {
                "apm": str(apm),
                "data": str(data),
                "out": str(work / "ours"),
                "tracking": {"enabled": False},
            }
        )
    )
    ours = pq.read_table(sorted((work / "ours").glob("part-*.parquet"))).to_pandas()
    names = [
        c[4:]
        for c in ours.columns
        if c.startswith("apm_") and not c.endswith("_int") and c not in ("apm_model", "apm_schema")
    ]
    from helpsteer_core.attributes import STEERLM

    ours_pred = ours[[f"apm_{n}" for n in names]].to_numpy()
    base_pred = np.load(work / "baseline-input.npy")[:, [STEERLM.index(n) for n in names]]
    sorted_pred = np.load(work / "baseline-sorted.npy")[:, [STEERLM.index(n) for n in names]]
    for order, base in bases.items():
        rps = base["rows"] / base["seconds"]
        print(
            f"baseline (1 process, batch {args.batch_size}, {order} order): {rps:.1f} rows/s, "
            f"{base['seconds']:.1f} s, peak RSS {base['peak_rss_mb']:.0f} MB"
        )
    print(
        f"relabel stage (Ray Data, {2} actors, token budget):        {stats['rows_per_second']:.1f} rows/s, "
        f"{stats['seconds']:.1f} s, peak RSS per actor {stats['peak_rss_mb_per_actor']:.0f} MB"
    )
    for order, base in bases.items():
        ratio = stats["rows_per_second"] * base["seconds"] / base["rows"]
        print(f"ratio (ours / baseline in {order} order): {ratio:.2f}x")
    gap = np.abs(sorted_pred - base_pred).max()
    print(f"sorted baseline vs input-order baseline, largest prediction difference: {gap:.2e}")
    # Rows longer than max_length are truncated differently on purpose (the baseline's
    # longest_first cuts the response end; ours cuts the prompt start), so compare the rest.
    from helpsteer_core.apm import load_apm_tokenizer

    tokenizer = load_apm_tokenizer(apm)
    max_length = json.loads((apm / "apm_config.json").read_text())["max_length"]
    fits = np.array([len(tokenizer(r["prompt"], r["response"])["input_ids"]) <= max_length for r in rows])
    diff = np.abs(ours_pred - base_pred).max(axis=1)
    print(
        f"largest prediction difference on the {fits.sum()} rows that fit in {max_length} tokens: "
        f"{diff[fits].max():.2e}; on the {(~fits).sum()} truncated rows: "
        f"{diff[~fits].max() if (~fits).any() else 0:.2e} (different truncation rules)"
    )


if __name__ == "__main__":
    main()
