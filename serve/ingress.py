"""The HTTP ingress deployment: `serve.api`'s FastAPI app over handles to the model deployments.

The ingress holds no model weights, only the generator's tokenizer (to build and check prompts
before any replica is busy). It talks to `serve.deployments.Generator` (or `serve.vllm`'s
adapter) and `serve.deployments.APM` through deployment handles.

A non-streamed request whose generator or APM replica dies before answering is sent once more
(Serve routes it to a live replica); a stream that already sent text cannot be replayed, so it
ends with an error event. Either way the ingress keeps serving, and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle

from helpsteer_core.config import ConfigError
from serve.api import Frontend, Reward, Settings, build_api
from serve.app import check_exposure
from serve.engine import Choice, ChoiceDelta, GenerationJob
from serve.protocol import APIError, LimitArgs
from serve.reward import ChatSplitter, RewardArgs, check_weights
from serve.steerable import SteerablePrompts

log = logging.getLogger("ray.serve")
# A replica that died or was unreachable: the request never finished there, so sending it again
# cannot run it twice to completion.
REPLICA_GONE: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
)


async def _await(response: Any) -> Any:
    """A handle call's result; if the caller is cancelled (timeout, client gone), so is the call:
    Serve does not cancel the replica's work when an awaiting task is cancelled."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


async def _once_more(call: Callable[[], Any], what: str) -> Any:
    try:
        return await _await(call())
    except REPLICA_GONE as exc:
        log.warning("%s replica gone (%s); sending the request once more", what, type(exc).__name__)
    try:
        return await _await(call())
    except REPLICA_GONE as exc:
        raise APIError(
            503, f"the {what} replica serving this request died twice ({type(exc).__name__}); retry later",
            code="replica_unavailable", kind="server_error",
        ) from None  # fmt: skip


class HandleGenerator:
    """`serve.api.GeneratorClient` over a handle to `serve.deployments.Generator`."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, job: GenerationJob) -> list[Choice]:
        return await _once_more(lambda: self.handle.generate.remote(job), "generator")

    async def stream(self, job: GenerationJob) -> AsyncIterator[list[ChoiceDelta]]:
        response = self.handle.options(stream=True).stream.remote(job)
        try:
            async for deltas in response:
                yield deltas
        except REPLICA_GONE as exc:
            raise APIError(
                503,
                f"the generator replica serving this stream died ({type(exc).__name__}); retry the request",
                code="replica_unavailable",
                kind="server_error",
            ) from None
        finally:
            response.cancel()  # a no-op when finished; stops the generation when the client left

    async def ready(self) -> None:
        await self.handle.ready.remote()


class HandleAPM:
    """`serve.api.ApmClient` over a handle to `serve.deployments.APM` (one call per response:
    the APM's `@serve.batch` batches them with every other request's)."""

    def __init__(self, handle: DeploymentHandle, trained: list[str]):
        self.handle, self.trained = handle, trained

    async def score(self, prompt: str, responses: Sequence[str]) -> list[list[float]]:
        async def one(response: str) -> list[float]:
            return await _once_more(lambda: self.handle.score.remote((prompt, response)), "APM")

        return list(await asyncio.gather(*(one(r) for r in responses)))

    async def ready(self) -> None:
        await self.handle.ready.remote()


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # tokenizes and forwards; the model replicas do the work
    max_ongoing_requests=256,
    health_check_period_s=10,
)
@serve.ingress()
class Ingress:
    def __init__(
        self,
        generator: DeploymentHandle | Any,
        apm: DeploymentHandle | None,
        folder: str,
        settings: dict[str, Any],
    ):
        self.folder, self.settings = folder, settings
        self.generator_handle, self.apm_handle = generator, apm
        self.prompts = SteerablePrompts.load(folder)

    async def __serve_build_asgi_app__(self) -> Any:
        args = self.settings
        host = _get_global_client().http_config.host  # where Serve's proxies listen
        # Raises (the replica does not start, and Serve reports why) when the app would listen
        # beyond loopback with no key; this is where the key is read, whoever built the app.
        api_key = check_exposure(
            host, args["api_key_env"], args["allow_unauthenticated"], os.environ, "helpsteer ingress"
        )
        log.info(
            "ingress: listening on %s; API key %s",
            host,
            f"required (from ${args['api_key_env']})" if api_key else "not asked for (open)",
        )
        apm = None
        if self.apm_handle is not None:
            info = await self.apm_handle.info.remote()
            apm = HandleAPM(self.apm_handle, info["trained"])
        if args["engine"] == "vllm":
            from serve.vllm import VLLMGenerator

            generator: Any = VLLMGenerator(self.generator_handle, args["model_name"], self.prompts)
        else:
            generator = HandleGenerator(self.generator_handle)
        reward = None
        if apm is not None:
            reward = _reward_setup(
                RewardArgs.model_validate(args["reward"]), self.prompts.tokenizer, apm.trained
            )
        settings = Settings(
            model_name=args["model_name"],
            profile=args["defaults"],
            default_temperature=args["default_temperature"],
            limits=LimitArgs.model_validate(args["limits"]),
            api_key=api_key or None,
        )
        return build_api(Frontend(settings, self.prompts, generator, apm, reward))


def _reward_setup(args: RewardArgs, generator_tokenizer: Any, trained: Sequence[str]) -> Reward | None:
    """`/get_reward`'s splitter (the actor's chat template; the generator's own when none is named)
    and checked weights. A setting the user gave that cannot work stops the app; with the defaults,
    a generator without a chat template only turns the endpoint off, with a warning."""
    from helpsteer_core.generator import load_generator_tokenizer

    weights = check_weights(args.vector(), trained)
    if args.chat_template_from is not None:
        return Reward(ChatSplitter.from_tokenizer(load_generator_tokenizer(args.chat_template_from)), weights)
    try:
        return Reward(ChatSplitter.from_tokenizer(generator_tokenizer), weights)
    except ConfigError as exc:
        log.warning("ingress: POST /get_reward is off: %s", exc)
        return None
