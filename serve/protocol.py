"""The HTTP API's request bodies, their checks, and OpenAI-shaped errors.

Requests are OpenAI's chat completion body plus `attributes` (name -> integer 0-4, or null to
leave an attribute out of the prompt) and `best_of`; `/v1/score` and `/v1/steer` have bodies of
their own. Every check raises `APIError`, which the ingress returns as

    {"error": {"message": "...what was wrong... allowed: ...", "type": "invalid_request_error",
               "param": "attributes.verbosity", "code": "invalid_attribute"}}

with a 4xx status. Unknown fields are errors too (a misspelt `atributes` would otherwise be
dropped and the request silently unsteered); OpenAI fields that this server does not implement
are accepted only at their no-op values.

No ray imports: the checks are plain functions of the body and the server's limits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, STEERLM, AttributeValueError
from helpsteer_core.config import StrictModel
from helpsteer_core.conversation import ConversationFormatError, Turn, parse_prompt_turns

SCHEMA = STEERLM
Profile = Literal["helpsteer", "helpsteer2"]


class LimitArgs(StrictModel):
    """What one request may ask for; over a limit is a 4xx that names the limit."""

    max_tokens: int = Field(default=512, ge=1)  # cap on max_tokens
    # When a request names none; lowered to max_tokens and to what fits the context.
    default_max_tokens: int = Field(default=256, ge=1)
    max_n: int = Field(default=8, ge=1)  # cap on n, best_of and /v1/steer candidates
    max_responses: int = Field(default=32, ge=1)  # cap on responses per /v1/score request
    max_queries: int = Field(default=256, ge=1)  # cap on queries per /get_reward request (OpenRLHF)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    request_timeout_s: float = Field(default=120.0, gt=0)  # then 408; a stream ends with an error event


class APIError(Exception):
    """An error the client gets as JSON: what was wrong, where, and what is allowed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """OpenAI's chat completion body, the fields this server implements, plus steering."""

    model: str | None = None
    messages: list[Message]
    # name -> 0..4 (null: leave it out); missing names take the server's profile defaults.
    attributes: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    # Sample best_of candidates, score them with the APM, return the n closest to the attributes.
    best_of: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Accepted only at their no-op values (checked in `check_unsupported`).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False


class ScoreRequest(_Body):
    model: str | None = None
    prompt: str | None = None  # a HelpSteer2 prompt (turns joined by <extra_id_1>), or:
    messages: list[Message] | None = None
    responses: list[str]


class RewardRequest(_Body):
    """OpenRLHF's remote reward request: prompt + response texts as the actor's chat template wrote
    them, optionally the prompts alone; `labels` (reference answers for rule-based rewards) is
    accepted and not used."""

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class SteerRequest(_Body):
    """Best-of-n steering: sample `candidates`, return them ranked by distance to `attributes`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    attributes: dict[str, Any] | None = None
    candidates: int = Field(default=4, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """The body as `model`, or a 400 naming each bad field and, for unknown ones, the allowed."""
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, model) from None


def _validation_error(exc: ValidationError, model: type[BaseModel]) -> APIError:
    problems, params = [], []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        params.append(loc)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, error["loc"][:-1])
            problems.append(f"unknown field {loc!r}; allowed: {', '.join(allowed)}")
        elif error["type"] == "missing":
            problems.append(f"{loc}: required")
        else:
            problems.append(f"{loc}: {error['msg']} (got {error.get('input')!r})")
    return APIError(400, "; ".join(problems), code="invalid_field", param=params[0] if params else None)


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            break
        current = model_in(field.annotation) or current
    return sorted(current.model_fields)


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (Optional[...], list[...], Model | dict), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None


# --- checks ---------------------------------------------------------------------------------------


def resolve_attributes(requested: Mapping[str, Any] | None, profile: Profile) -> dict[str, int]:
    """The profile's defaults overridden by the request (null removes one), in schema order.

    Each value is checked by the schema: an unknown name, a value outside 0-4, and a non-integer
    are 400s naming the attribute and the allowed values; nothing is rounded or clamped.
    """
    chosen: dict[str, int | None] = dict(DEFAULT_ATTRIBUTES[profile])
    for name, value in (requested or {}).items():
        try:
            chosen[name] = None if value is None else SCHEMA.check_value(name, value)
        except AttributeValueError as exc:
            raise APIError(400, str(exc), code="invalid_attribute", param=f"attributes.{name}") from None
    return {name: v for name in SCHEMA.names if (v := chosen.get(name)) is not None}


def _text(message: Message, index: int) -> str:
    if message.content is None:
        raise APIError(
            400, f"messages[{index}].content is empty", code="invalid_message", param=f"messages.{index}"
        )
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def turns_from_messages(
    messages: list[Message] | None, param: str = "messages"
) -> tuple[list[Turn], str | None]:
    """(turns, system text or None) from OpenAI messages: an optional first system message, then
    user and assistant messages alternating, starting and ending with the user."""
    if not messages:
        raise APIError(
            400,
            f"{param} is empty; allowed: a list of messages (an optional first system message, then user "
            "and assistant messages alternating, ending with a user message)",
            code="empty_messages",
            param=param,
        )
    system = None
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        where = f"{param}[{index}]"
        if message.role in ("system", "developer"):
            if index != 0:
                raise APIError(
                    400,
                    f"{where}: a system message is allowed only first",
                    code="invalid_message",
                    param=where,
                )
            system = _text(message, index)
            continue
        if message.role not in ("user", "assistant"):
            raise APIError(
                400,
                f"{where}.role {message.role!r}; allowed: system, developer, user, assistant",
                code="invalid_message",
                param=f"{where}.role",
            )
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(
                400,
                f"{where} is from the {message.role}, expected the {expected}: user and assistant messages "
                "must alternate, starting with the user",
                code="invalid_message",
                param=f"{where}.role",
            )
        turns.append(Turn("User" if message.role == "user" else "Assistant", _text(message, index)))
    if not turns or turns[-1].role != "User":
        raise APIError(
            400, f"the last message of {param} must be from the user", code="invalid_message", param=param
        )
    return turns, system


def turns_from_prompt_or_messages(
    prompt: str | None, messages: list[Message] | None
) -> tuple[list[Turn], str | None]:
    if (prompt is None) == (messages is None):
        raise APIError(400, "give exactly one of prompt and messages", code="invalid_field", param="messages")
    if messages is not None:
        return turns_from_messages(messages)
    if not prompt:
        raise APIError(400, "prompt is empty", code="empty_messages", param="prompt")
    try:
        turns = parse_prompt_turns(prompt)
    except ConversationFormatError as exc:
        raise APIError(400, f"prompt: {exc}", code="invalid_message", param="prompt") from None
    if turns[-1].role != "User":
        raise APIError(
            400, "the prompt's last turn must be the user's", code="invalid_message", param="prompt"
        )
    return turns, None


def check_count(name: str, value: int, cap: int) -> None:
    if value > cap:
        raise APIError(
            400,
            f"{name} {value} is above this server's cap of {cap}; allowed: 1..{cap}",
            code="above_cap",
            param=name,
        )


def stop_strings(stop: str | list[str] | None, cap: int = 4) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > cap or any(not s for s in stops):
        raise APIError(
            400,
            f"stop: {stops!r}; allowed: up to {cap} non-empty strings",
            code="invalid_field",
            param="stop",
        )
    return tuple(stops)


def check_unsupported(request: ChatCompletionRequest) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) != 0:
            raise APIError(
                400, f"{name} is not supported by this server; allowed: 0", code="unsupported", param=name
            )
    if request.logprobs:
        raise APIError(
            400,
            "logprobs is not supported by this server; allowed: false",
            code="unsupported",
            param="logprobs",
        )
