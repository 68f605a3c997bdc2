"""The GPU generator path: vLLM through Ray Serve LLM (`engine: vllm`).

`ray.serve.llm` imports vLLM, so this module is imported only when the app asks for the vLLM
engine; CPU machines never need it. The ingress still builds and checks every prompt
(`serve.steerable`), then sends the token ids to a Ray Serve LLM `LLMServer` deployment as
OpenAI completion requests (`ray.serve.llm.openai_api_models.CompletionRequest`, Ray Serve LLM's
public API); vLLM batches continuously across requests. Each choice is its own request with
seed + index, as `serve.engine` seeds its rows, and a request's choices are sent together (n and
best-of candidates run concurrently; a stream interleaves their deltas as they come).

Not exercised by the test suite (this workplace has neither a GPU nor vLLM); the CPU path is
`serve.deployments.Generator`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from serve.engine import Choice, ChoiceDelta, GenerationJob, collect
from serve.protocol import APIError
from serve.steerable import SteerablePrompts

if TYPE_CHECKING:
    from serve.app import VLLMArgs


def llm_config(model_name: str, folder: str, context: int, args: VLLMArgs) -> dict[str, Any]:
    """Ray Serve LLM's `LLMConfig` fields for a trained generator folder: the model read from the
    folder (no hub download), vLLM's engine arguments, one GPU bundle per engine worker packed on
    as few nodes as possible, and the replicas' autoscaling."""
    engine = {
        "max_model_len": context,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }
    if args.max_num_seqs is not None:
        engine["max_num_seqs"] = args.max_num_seqs
    return {
        "model_loading_config": {"model_id": model_name, "model_source": folder},
        "engine_kwargs": engine,
        "accelerator_type": args.accelerator_type,
        "placement_group_config": {
            "bundle_per_worker": {"GPU": 1, "CPU": args.cpus_per_worker},
            "strategy": "PACK" if args.pipeline_parallel_size == 1 else "SPREAD",
        },
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas,
                "target_ongoing_requests": args.target_ongoing_requests,
            },
            "max_ongoing_requests": args.max_ongoing_requests,
        },
    }


def build_llm_deployment(model_name: str, folder: str, context: int, args: VLLMArgs) -> Any:
    """The `LLMServer` application for a trained generator folder (a Hugging Face folder)."""
    from ray.serve.llm import LLMConfig
    from ray.serve.llm import build_llm_deployment as build

    return build(LLMConfig(**llm_config(model_name, folder, context, args)), name_prefix="helpsteer:")


class VLLMGenerator:
    """`serve.api.GeneratorClient` over a handle to a Ray Serve LLM `LLMServer`."""

    def __init__(self, handle: Any, model_name: str, prompts: SteerablePrompts):
        self.handle, self.model_name, self.prompts = handle, model_name, prompts

    def _request(self, job: GenerationJob, index: int, stream: bool) -> Any:
        from ray.serve.llm.openai_api_models import CompletionRequest

        params = job.params
        return CompletionRequest(
            model=self.model_name,
            prompt=list(job.prompt_ids),
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed + index,
            stop=list(params.stop) or None,
            stop_token_ids=list(self.prompts.stop_ids),
            skip_special_tokens=True,
            stream=stream,
        )

    async def _events(self, job: GenerationJob, index: int, stream: bool) -> AsyncIterator[dict[str, Any]]:
        async for item in self.handle.options(stream=True).completions.remote(
            self._request(job, index, stream)
        ):
            for entry in item if isinstance(item, list) else [item]:
                if isinstance(entry, str):
                    payload = entry.removeprefix("data: ").strip()
                    if payload and payload != "[DONE]":
                        yield json.loads(payload)
                else:
                    yield entry.model_dump()

    async def generate(self, job: GenerationJob) -> list[Choice]:
        async def choice(index: int) -> list[list[ChoiceDelta]]:
            events = self._events(job, index, stream=False)
            return [[_delta(event, index, final_text=True)] async for event in events]

        per_choice = await asyncio.gather(*(choice(index) for index in range(job.n)))
        return collect([step for steps in per_choice for step in steps], job.n)

    async def stream(self, job: GenerationJob) -> AsyncIterator[list[ChoiceDelta]]:
        """Every choice's deltas as they arrive, the choices' requests running at once."""
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            first = True
            try:
                async for event in self._events(job, index, stream=True):
                    delta = _delta(event, index, final_text=False)
                    if first:  # the first text of a choice starts without the template's space
                        delta = ChoiceDelta(
                            index, delta.text.lstrip(), delta.finish_reason, delta.completion_tokens
                        )
                        first = not delta.text
                    await queue.put(delta)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(index)) for index in range(job.n)]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield [item]
        finally:
            for task in tasks:
                task.cancel()

    async def ready(self) -> None:
        await self.handle.check_health.remote()


def _delta(event: dict[str, Any], index: int, final_text: bool) -> ChoiceDelta:
    if "error" in event or "message" in event and "choices" not in event:
        raise APIError(
            503,
            f"vLLM: {event.get('error') or event.get('message')}",
            code="generation_failed",
            kind="server_error",
        )
    choice = event["choices"][0]
    text = choice.get("text") or ""
    reason = choice.get("finish_reason")
    usage = event.get("usage") or {}
    return ChoiceDelta(
        index,
        text.strip() if final_text else text,
        None if reason is None else ("length" if reason == "length" else "stop"),
        int(usage.get("completion_tokens") or 0),
    )
