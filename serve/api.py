"""The HTTP API: an OpenAI-compatible chat endpoint with attributes, scoring and best-of-n steering.

    POST /v1/chat/completions   OpenAI's body + `attributes` and `best_of`; `stream: true` is SSE
    POST /v1/score              {prompt | messages, responses: [...]} -> the APM's attributes of each,
                                and `levels`: where they fall on this generator's levels
    POST /v1/steer              {prompt | messages, attributes, candidates} -> candidates ranked by
                                their distance to the attributes (the closest first)
    POST /get_reward            OpenRLHF's remote reward model: {query: [...], prompts?: [...]} ->
                                {rewards: [...]}, the APM's attributes weighted (serve.reward)
    GET  /v1/models             the served model, its context, attributes and defaults
    GET  /healthz               200 when the generator (and the APM) answer, else 503
    GET  /                      the steering playground (serve/static: a page that talks only to
                                the endpoints above, with the key the user types into it)

`Frontend` is the logic: decode and check a request, build the exact prompt the generator was
trained on (`serve.steerable`), call the generator and the APM through the small client
protocols below, encode the answer. `build_api` puts it behind FastAPI with the body-size limit,
the optional API key (`Authorization: Bearer KEY`, compared in constant time), the request
timeout and JSON errors. The Serve ingress (`serve.ingress`) passes clients backed by deployment
handles; tests and the benchmark can pass in-process ones.

Best-of-n: the candidates' APM predictions are compared with the requested attributes on the
attributes that are both requested and trained in the APM, placed first on the generator's own
levels (`LevelScale`: a model trained on the APM's predictions ranked into levels learnt level k
from a band of predictions; `levels` in the answer); the distance is Euclidean on the 0-4 scale,
and the closest candidates win (ties: the lower index).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES
from helpsteer_core.bootstrap import distance
from helpsteer_core.conversation import Turn, join_prompt_turns
from serve.engine import Choice, ChoiceDelta, GenerationJob, SamplingParams
from serve.protocol import (
    SCHEMA,
    APIError,
    ChatCompletionRequest,
    LimitArgs,
    Profile,
    RewardRequest,
    ScoreRequest,
    SteerRequest,
    check_count,
    check_unsupported,
    parse_body,
    resolve_attributes,
    stop_strings,
    turns_from_messages,
    turns_from_prompt_or_messages,
)
from serve.reward import ChatSplitter, weighted_reward
from serve.steerable import PromptTooLong, SteerablePrompts


class GeneratorClient(Protocol):
    async def generate(self, job: GenerationJob) -> list[Choice]: ...

    def stream(self, job: GenerationJob) -> AsyncIterator[list[ChoiceDelta]]: ...

    async def ready(self) -> None: ...


class ApmClient(Protocol):
    trained: list[str]  # the attributes the APM was trained on (its other outputs mean nothing)

    async def score(self, prompt: str, responses: Sequence[str]) -> list[list[float]]: ...

    async def ready(self) -> None: ...


STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class Settings:
    model_name: str
    profile: Profile  # whose defaults fill the attributes a request leaves out
    default_temperature: float
    limits: LimitArgs
    api_key: str | None  # None: no key needed


@dataclass(frozen=True)
class _Plan:
    """A checked generation request: the job for the generator and what the answer reports."""

    job: GenerationJob
    attributes: dict[str, int]
    turns: list[Turn]


@dataclass(frozen=True)
class Reward:
    """`POST /get_reward`'s setup: the actor's chat template and the attribute weights."""

    splitter: ChatSplitter
    weights: Mapping[str, float]  # the non-zero weights by attribute (serve.reward.check_weights)


class Frontend:
    def __init__(
        self,
        settings: Settings,
        prompts: SteerablePrompts,
        generator: GeneratorClient,
        apm: ApmClient | None,
        reward: Reward | None = None,
    ):
        self.settings, self.prompts, self.generator, self.apm = settings, prompts, generator, apm
        self.reward = reward

    # --- requests -> jobs --------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.settings.model_name):
            raise APIError(
                404,
                f"model {model!r} not found; available: {self.settings.model_name}",
                code="model_not_found",
                param="model",
                kind="not_found_error",
            )

    def _need_apm(self, param: str | None = None) -> ApmClient:
        """The APM client; without one, a 404 for an APM endpoint or a 400 naming the field."""
        if self.apm is None:
            raise APIError(
                404 if param is None else 400,
                "this server runs without an APM (app argument apm is null); scoring and best-of "
                "steering need one",
                code="apm_not_configured",
                param=param,
            )
        return self.apm

    def _plan(
        self,
        turns: list[Turn],
        system: str | None,
        requested: Mapping[str, Any] | None,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: str | list[str] | None,
        seed: int | None,
        rows: int,
    ) -> _Plan:
        limits = self.settings.limits
        attributes = resolve_attributes(requested, self.settings.profile)
        if max_tokens is not None:
            check_count("max_tokens", max_tokens, limits.max_tokens)
        try:
            ids = self.prompts.prompt_ids(turns, attributes, max_tokens or 1, system)
        except PromptTooLong as exc:
            raise APIError(400, str(exc), code="context_length_exceeded", param="messages") from None
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, limits.max_tokens, self.prompts.context - len(ids))
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.settings.default_temperature if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            stop=stop_strings(stop),
            seed=secrets.randbelow(2**31) if seed is None else seed,
        )
        job = GenerationJob(tuple(ids), params, rows, uuid.uuid4().hex)
        return _Plan(job, attributes, turns)

    # --- endpoints ---------------------------------------------------------------------------------

    async def chat(self, body: bytes) -> dict[str, Any] | AsyncIterator[str]:
        request: ChatCompletionRequest = parse_body(ChatCompletionRequest, body)
        self._check_model(request.model)
        check_unsupported(request)
        check_count("n", request.n, self.settings.limits.max_n)
        best_of = request.best_of or request.n
        if best_of < request.n:
            raise APIError(
                400,
                f"best_of {best_of} is below n {request.n}; allowed: best_of >= n",
                code="invalid_field",
                param="best_of",
            )
        check_count("best_of", best_of, self.settings.limits.max_n)
        turns, system = turns_from_messages(request.messages)
        max_tokens = request.max_tokens if request.max_tokens is not None else request.max_completion_tokens
        plan = self._plan(
            turns, system, request.attributes, max_tokens, request.temperature, request.top_p,
            request.stop, request.seed, best_of,
        )  # fmt: skip
        if best_of > request.n:
            self._need_apm("best_of")
            if request.stream:
                raise APIError(
                    400,
                    "best_of > n cannot be streamed: every candidate is scored first; allowed: stream false",
                    code="invalid_field",
                    param="stream",
                )
            if plan.job.params.temperature == 0:
                raise APIError(
                    400,
                    "best_of > n needs temperature > 0: greedy candidates are all the same",
                    code="invalid_field",
                    param="temperature",
                )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        if request.stream:
            return self._chat_stream(plan, include_usage)
        choices = await self.generator.generate(plan.job)
        extra: dict[str, Any] = {}
        ranked: list[dict[str, Any]] = [{"choice": c} for c in choices]
        if best_of > request.n:
            ranked, compared = await self._rank(plan, choices)
            extra["best_of"] = {"candidates": best_of, "compared_on": compared}
        body_choices = []
        for index, item in enumerate(ranked[: request.n]):
            choice: Choice = item["choice"]
            entry = {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason,
                "logprobs": None,
            }
            if "distance" in item:
                entry |= {
                    "scores": item["scores"],
                    "levels": item["levels"],
                    "distance": item["distance"],
                    "candidate": choice.index,
                }
            body_choices.append(entry)
        return {
            "id": f"chatcmpl-{plan.job.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": body_choices,
            "usage": _usage(plan, choices),
            "attributes": plan.attributes,
            "attribute_profile": self.settings.profile,
            **extra,
        }

    async def _chat_stream(self, plan: _Plan, include_usage: bool) -> AsyncIterator[str]:
        head = {
            "id": f"chatcmpl-{plan.job.request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.settings.model_name,
        }

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

        yield chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(plan.job.n)
            ],
            attributes=plan.attributes,
        )
        tokens = 0
        async for deltas in self.generator.stream(plan.job):
            text = [
                {"index": d.index, "delta": {"content": d.text}, "finish_reason": None}
                for d in deltas
                if d.text
            ]
            if text:
                yield chunk(text)
            for d in deltas:
                if d.finish_reason is not None:
                    tokens += d.completion_tokens
                    yield chunk(
                        [{"index": d.index, "delta": {}, "finish_reason": d.finish_reason}],
                        attributes=plan.attributes,
                    )
        if include_usage:
            prompt = len(plan.job.prompt_ids)
            usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    async def _rank(self, plan: _Plan, choices: list[Choice]) -> tuple[list[dict[str, Any]], list[str]]:
        """Candidates with their APM scores and distance to the request, the closest first."""
        apm = self._need_apm("best_of")
        compared = [name for name in plan.attributes if name in apm.trained]
        if not compared:
            raise APIError(
                400,
                f"none of the requested attributes {sorted(plan.attributes)} is one the APM was trained on "
                f"({', '.join(apm.trained)}); best-of steering compares on those",
                code="invalid_attribute",
                param="attributes",
            )
        predictions = await apm.score(join_prompt_turns(plan.turns), [c.text for c in choices])
        ranked: list[dict[str, Any]] = []
        scale = self.prompts.levels
        for choice, row in zip(choices, predictions, strict=True):
            scores = {name: round(row[SCHEMA.index(name)], 4) for name in apm.trained}
            levels = scale.placed({n: row[SCHEMA.index(n)] for n in compared})
            gap = distance(levels, plan.attributes, compared)
            ranked.append({"choice": choice, "scores": scores, "levels": levels, "distance": round(gap, 4)})
        ranked.sort(key=lambda item: (item["distance"], item["choice"].index))
        return ranked, compared

    async def steer(self, body: bytes) -> dict[str, Any]:
        request: SteerRequest = parse_body(SteerRequest, body)
        self._check_model(request.model)
        self._need_apm()
        check_count("candidates", request.candidates, self.settings.limits.max_n)
        turns, system = turns_from_prompt_or_messages(request.prompt, request.messages)
        plan = self._plan(
            turns, system, request.attributes, request.max_tokens, request.temperature, request.top_p,
            request.stop, request.seed, request.candidates,
        )  # fmt: skip
        if plan.job.params.temperature == 0 and request.candidates > 1:
            raise APIError(
                400,
                "candidates > 1 needs temperature > 0: greedy candidates are all the same",
                code="invalid_field",
                param="temperature",
            )
        choices = await self.generator.generate(plan.job)
        ranked, compared = await self._rank(plan, choices)
        candidates = [
            {
                "index": item["choice"].index,
                "text": item["choice"].text,
                "finish_reason": item["choice"].finish_reason,
                "scores": item["scores"],
                "levels": item["levels"],
                "distance": item["distance"],
            }
            for item in ranked
        ]
        best = candidates[0]
        return {
            "id": f"steer-{plan.job.request_id}",
            "object": "steer",
            "created": int(time.time()),
            "model": self.settings.model_name,
            "attributes": plan.attributes,
            "attribute_profile": self.settings.profile,
            "compared_on": compared,
            "response": best["text"],
            "scores": best["scores"],
            "levels": best["levels"],
            "distance": best["distance"],
            "candidates": candidates,
            "usage": _usage(plan, choices),
        }

    async def score(self, body: bytes) -> dict[str, Any]:
        request: ScoreRequest = parse_body(ScoreRequest, body)
        self._check_model(request.model)
        apm = self._need_apm()
        turns, _ = turns_from_prompt_or_messages(request.prompt, request.messages)
        if not request.responses:
            raise APIError(
                400, "responses is empty; allowed: 1 or more strings", code="invalid_field", param="responses"
            )
        check_count("responses", len(request.responses), self.settings.limits.max_responses)
        predictions = await apm.score(join_prompt_turns(turns), request.responses)
        data = []
        for i, row in enumerate(predictions):
            scores = {name: round(row[SCHEMA.index(name)], 4) for name in apm.trained}
            # Where each score falls on this generator's levels (what a request's value means).
            data.append({"index": i, "attributes": scores, "levels": self.prompts.levels.placed(scores)})
        return {
            "object": "list",
            "model": f"{self.settings.model_name}-apm",
            "attributes": apm.trained,
            "data": data,
        }

    async def get_reward(self, body: bytes) -> dict[str, Any]:
        request: RewardRequest = parse_body(RewardRequest, body)
        apm = self._need_apm()
        if self.reward is None:
            raise APIError(
                404,
                "this server has no reward setup: args.reward.chat_template_from names no tokenizer "
                "with a chat template (the server log says why)",
                code="reward_not_configured",
            )
        if not request.query:
            raise APIError(
                400, "query is empty; allowed: 1 or more strings", code="invalid_field", param="query"
            )
        check_count("query", len(request.query), self.settings.limits.max_queries)
        if request.prompts is not None and len(request.prompts) != len(request.query):
            raise APIError(
                400,
                f"prompts has {len(request.prompts)} entries and query {len(request.query)}; allowed: one "
                "prompt per query, or no prompts",
                code="invalid_field",
                param="prompts",
            )
        split: list[tuple[str, str]] = []
        for index, query in enumerate(request.query):
            prompt = None if request.prompts is None else request.prompts[index]
            try:
                turns, response = self.reward.splitter.split(query, prompt)
                split.append((join_prompt_turns(turns), response))
            except ValueError as exc:  # SplitError, or turns that do not alternate
                raise APIError(
                    400,
                    f"query[{index}]: {exc}; the server splits queries with the actor's chat template "
                    "(args.reward.chat_template_from)",
                    code="invalid_field",
                    param=f"query[{index}]",
                ) from None
        predictions = await asyncio.gather(*(apm.score(prompt, [response]) for prompt, response in split))
        rows = [prediction[0] for prediction in predictions]
        return {
            "rewards": [round(weighted_reward(row, self.reward.weights), 6) for row in rows],
            "attributes": [{name: round(row[SCHEMA.index(name)], 4) for name in apm.trained} for row in rows],
        }

    def models(self) -> dict[str, Any]:
        profile = self.settings.profile
        model = {
            "id": self.settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "helpsteer",
            "context_length": self.prompts.context,
            "max_tokens": self.settings.limits.max_tokens,
            "attributes": {
                "schema": SCHEMA.id,
                "names": list(SCHEMA.names),
                "range": [SCHEMA.low, SCHEMA.high],
                "profile": profile,
                "defaults": DEFAULT_ATTRIBUTES[profile],
                # What the model's attribute line carries (sft examples.condition_on): the others
                # are accepted in requests and left out of the prompt, as in training.
                "conditioned_on": self.prompts.config.condition_on or list(SCHEMA.names),
                # The APM scores that bound each level of a model trained on ranked APM levels
                # (attribute_levels.json); an attribute not listed is on the APM's own 0-4 scale.
                "level_cuts": {name: list(cuts) for name, cuts in self.prompts.levels.cuts.items()},
            },
            "apm": None if self.apm is None else {"trained_attributes": self.apm.trained},
        }
        return {"object": "list", "data": [model]}

    async def health(self) -> tuple[int, dict[str, Any]]:
        parts: dict[str, Any] = {
            "generator": self.generator.ready(),
            "apm": self.apm.ready() if self.apm else None,
        }
        report: dict[str, str] = {}
        for name, waiting in parts.items():
            if waiting is None:
                report[name] = "none"
                continue
            try:
                await asyncio.wait_for(waiting, timeout=5)
                report[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                report[name] = f"unavailable: {type(exc).__name__}"
        ok = all(v in ("ok", "none") for v in report.values())
        return (200 if ok else 503), {"status": "ok" if ok else "unavailable", **report}


def _usage(plan: _Plan, choices: Sequence[Choice]) -> dict[str, int]:
    prompt, completion = len(plan.job.prompt_ids), sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- HTTP -----------------------------------------------------------------------------------------


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> APIError:
    return APIError(
        413,
        f"the request body is {'over ' if at_least else ''}{size} bytes, over this server's limit; "
        f"allowed: at most {limit} bytes",
        code="body_too_large",
    )


def _timeout(limit: float) -> APIError:
    return APIError(
        408,
        f"the request did not finish within {limit:g} s (the server's request_timeout_s); "
        "ask for fewer tokens or choices, or retry",
        code="request_timeout",
        kind="timeout_error",
    )


def build_api(frontend: Frontend) -> FastAPI:
    """The FastAPI app around `frontend`: auth, body limit, timeout, JSON errors, SSE."""
    settings = frontend.settings
    limits = settings.limits
    api = FastAPI(title="helpsteer", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            {
                "error": {
                    "message": str(exc.detail),
                    "type": kind,
                    "param": None,
                    "code": str(exc.status_code),
                }
            },
            status_code=exc.status_code,
        )

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key; send the header Authorization: Bearer <key>",
                code="invalid_api_key",
                kind="authentication_error",
            )

    async def handle(request: Request, call: Callable[[bytes], Awaitable[Any]]) -> Response:
        check_key(request)
        deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
        body = await _read_body(request, limits.max_body_bytes)
        try:
            async with asyncio.timeout_at(deadline):
                result = await call(body)
        except TimeoutError:
            raise _timeout(limits.request_timeout_s) from None
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(
            _until(result, deadline, limits.request_timeout_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(request, frontend.chat)

    @api.post("/v1/score")
    async def score(request: Request) -> Response:
        return await handle(request, frontend.score)

    @api.post("/v1/steer")
    async def steer(request: Request) -> Response:
        return await handle(request, frontend.steer)

    @api.post("/get_reward")
    async def get_reward(request: Request) -> Response:
        return await handle(request, frontend.get_reward)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse(frontend.models())

    @api.get("/healthz")
    async def healthz() -> Response:
        status, body = await frontend.health()
        return JSONResponse(body, status_code=status)

    # The playground is public static files, like any web client: the key stays in the user's tab.
    @api.get("/")
    async def playground() -> Response:
        return FileResponse(STATIC / "index.html")

    api.mount("/static", StaticFiles(directory=STATIC), name="static")
    return api


async def _until(events: AsyncIterator[str], deadline: float, limit: float) -> AsyncIterator[str]:
    """Server-sent events until the deadline; past it (or on a failure) an error event, then [DONE].

    The OpenAI client raises on an event with an `error` key, so a stream that cannot finish
    says so instead of ending as if complete. Only the wait for the next event is timed, never
    the send to the client.
    """
    loop = asyncio.get_running_loop()
    error: APIError | None = None
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                event = await asyncio.wait_for(anext(events), remaining)
            except StopAsyncIteration:
                break
            yield event
    except TimeoutError:
        error = _timeout(limit)
    except APIError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - the status line has been sent; report in-band
        error = APIError(
            503,
            f"generation failed: {type(exc).__name__}: {exc}",
            code="generation_failed",
            kind="server_error",
        )
    finally:
        await _close(events)
    if error is not None:
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"


async def _close(events: AsyncIterator[str]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
