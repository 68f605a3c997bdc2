"""The model deployments: the steerable generator and the APM, each batching with `@serve.batch`.

- `Generator` (transformers on CPU or GPU): `generate(job)` returns the choices, `stream(job)`
  yields lists of `ChoiceDelta`s as they are decoded. Both go through one batched method, so
  streamed and plain requests share batches; a request leaves its batch as soon as its own
  choices are done. Batches are static (a request that arrives during a batch waits for the next);
  on GPUs `serve.vllm` batches continuously instead.
- `APM`: `score((prompt, response))` returns the APM's float for every attribute of the schema;
  concurrent calls (the responses of one request, and other requests) are scored together.

Each replica runs its model in one background thread, so the event loop stays free for health
checks and new requests; torch gets as many threads as the replica has CPUs (at least one:
oversubscribed cores make small models tens of times slower).

A replica's resources come from `ray_actor_options` (the decorators' CPU-only defaults, replaced
by a config's `deployments:` section: `cluster/kuberay/serve.yaml` gives each model replica GPUs),
and the model follows them: with a GPU assigned it loads in bf16 on cuda
(`ray_jobs.runtime.device_for_gpus`), the generator spread over the replica's GPUs; without one,
fp32 on CPU. Ray hides the GPUs a replica
did not ask for, so asking is what moves the model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ray_jobs.runtime import use_assigned_resources
from serve.engine import ChoiceDelta, GenerationJob, TransformersEngine, collect

log = logging.getLogger("ray.serve")
_END = object()


def _configure_batching(method: Any, batching: dict[str, Any]) -> None:
    """Apply the app's batching args to a `@serve.batch` method; `enabled: false` is batches of 1."""
    method.set_max_batch_size(batching["max_batch_size"] if batching["enabled"] else 1)
    method.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"] if batching["enabled"] else 0.0)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,  # enough waiting requests to fill a batch
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class Generator:
    def __init__(self, folder: str, batching: dict[str, Any], stuck_after_s: float):
        from serve.steerable import load_steerable, read_training_setup

        threads, _, _ = use_assigned_resources()
        model, tokenizer, stop_ids = load_steerable(folder, read_training_setup(folder)["examples"])
        self.engine = TransformersEngine(model, tokenizer, stop_ids)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        _configure_batching(self._steps, batching)
        self.stuck_after_s = stuck_after_s
        self.busy_since: float | None = None
        log.info("generator %s: %d torch threads, batching %s", folder, threads, batching)

    def ready(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        """Unhealthy when one batch has run far longer than any request may (a wedged model)."""
        if self.busy_since is not None and time.monotonic() - self.busy_since > self.stuck_after_s:
            raise RuntimeError(f"one generate call has run for over {self.stuck_after_s:.0f} s")

    async def generate(self, job: GenerationJob) -> list[Any]:
        steps = [deltas async for deltas in self.stream(job)]
        return collect(steps, job.n)

    async def stream(self, job: GenerationJob) -> AsyncIterator[list[ChoiceDelta]]:
        cancel = threading.Event()
        try:
            async for deltas in self._steps((job, cancel)):
                if deltas:
                    yield deltas
        finally:
            cancel.set()  # the caller went away (timeout, disconnect): its rows stop at the next step

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _steps(self, items: list[tuple[GenerationJob, threading.Event]]) -> AsyncIterator[list[Any]]:
        """One engine run for the batch; per step, each request's deltas (StopIteration when done)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        jobs = [job for job, _ in items]

        def emit(step: list[list[ChoiceDelta]]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, step)

        def run() -> None:
            self.busy_since = time.monotonic()
            try:
                self.engine.run(jobs, emit, lambda j: items[j][1].is_set())
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                self.busy_since = None

        running = loop.run_in_executor(self.executor, run)
        open_choices = [job.n for job in jobs]
        try:
            while (step := await queue.get()) is not _END:
                if isinstance(step, BaseException):
                    raise step
                out: list[Any] = []
                for j, deltas in enumerate(step):
                    if open_choices[j] <= 0:
                        out.append(StopIteration)  # finished at an earlier step: release its caller
                        continue
                    out.append(deltas)
                    open_choices[j] -= sum(d.finish_reason is not None for d in deltas)
                yield out
        finally:
            for _, cancel in items:  # the batch itself was cancelled: stop the engine
                if not running.done():
                    cancel.set()
            await asyncio.shield(running)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=128,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class APM:
    def __init__(self, folder: str, batching: dict[str, Any]):
        import torch

        from helpsteer_core.apm import AttributePredictionModel, load_trained_attributes
        from helpsteer_core.attributes import STEERLM

        threads, self.device, dtype = use_assigned_resources()
        self.model = AttributePredictionModel.from_pretrained(folder, STEERLM, dtype=getattr(torch, dtype))
        self.model.to(self.device)
        self.model.eval()
        self.trained = load_trained_attributes(folder, STEERLM)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apm")
        _configure_batching(self.score, batching)
        log.info(
            "APM %s on %s (%s): %d torch threads, trained on %s, batching %s",
            folder,
            self.device,
            dtype,
            threads,
            self.trained,
            batching,
        )

    def ready(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def info(self) -> dict[str, Any]:
        return {
            "schema": self.model.schema.id,
            "names": list(self.model.schema.names),
            "trained": self.trained,
        }

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score(self, pairs: list[tuple[str, str]]) -> list[list[float]]:
        """(prompt, response) -> the APM's prediction for each schema attribute, in schema order."""
        from helpsteer_core.apm import predict

        prompts = [p for p, _ in pairs]
        responses = [r for _, r in pairs]
        loop = asyncio.get_running_loop()
        predictions = await loop.run_in_executor(
            self.executor,
            functools.partial(
                predict, self.model, self.model.tokenizer, prompts, responses, device=self.device
            ),
        )  # (pairs, n_attr)
        return [[float(v) for v in row] for row in predictions]
