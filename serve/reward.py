"""The APM as a reward model for RLHF trainers: OpenRLHF's remote reward protocol.

OpenRLHF trains PPO against a remote reward server (`--remote_rm_url http://HOST/get_reward`):
it POSTs `{"query": [...], "prompts": [...], "labels": [...]}`, where each query is the actor's
chat-template-formatted prompt followed by its sampled response (special tokens kept, maybe an
end-of-sequence and padding), each prompt is that formatted prompt alone, and it reads
`{"rewards": [...]}`, one float per query.

Here a query becomes a conversation again: its prompt is taken off the front (the `prompts` entry
when given, else everything up to the last assistant header), the prompt is split into turns by
the actor's chat template (`ChatSplitter`), the APM scores the response given those turns, and the
reward is the weighted sum of the APM's nine attributes in NeMo-Aligner's order (quality,
toxicity, humor, creativity, helpfulness, correctness, coherence, complexity, verbosity). The
presets are the published weights: the HelpSteer2 paper's Llama-3-70B RewardBench weights (App.
H) and Nemotron-4-340B-Reward's.

`ChatSplitter` learns a template's delimiters by rendering sentinel messages with the template
itself, so it follows whatever template the actor uses (ChatML, Llama 3, ...), not a hard-coded
one. No ray imports: the ingress and the tests share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import field_validator

from helpsteer_core.attributes import STEERLM
from helpsteer_core.config import ConfigError, StrictModel
from helpsteer_core.conversation import Turn

SCHEMA = STEERLM
# The published weights, in NeMo-Aligner's nine-attribute order (SCHEMA.names).
REWARD_PRESETS: dict[str, tuple[float, ...]] = {
    # HelpSteer2 paper (arXiv 2406.08673) App. H: Llama-3-70B SteerLM RM on RewardBench
    "llama3-70b-rewardbench": (0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4),
    # Nemotron-4-340B-Reward's model card
    "nemotron-4-340b-reward": (0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33),
}
_SENTINELS = ("\x01SYS\x01", "\x01U1\x01", "\x01A1\x01", "\x01U2\x01")


class RewardArgs(StrictModel):
    """`args.reward` of the Serve app: how `POST /get_reward` turns the APM's attributes into one
    reward, and whose chat template the trainer's actor formats its prompts with."""

    # A preset name (REWARD_PRESETS) or nine floats in NeMo-Aligner's attribute order.
    weights: str | list[float] = "llama3-70b-rewardbench"
    # A tokenizer folder or Hub id whose chat template the actor uses; null: the served generator's.
    chat_template_from: str | None = None

    @field_validator("weights")
    @classmethod
    def _known(cls, value: str | list[float]) -> str | list[float]:
        if isinstance(value, str) and value not in REWARD_PRESETS:
            raise ValueError(f"weights preset {value!r}; allowed: {', '.join(REWARD_PRESETS)} or nine floats")
        if isinstance(value, list) and len(value) != len(SCHEMA.names):
            raise ValueError(
                f"weights has {len(value)} values; give {len(SCHEMA.names)}, in the order "
                f"{', '.join(SCHEMA.names)}"
            )
        return value

    def vector(self) -> tuple[float, ...]:
        return REWARD_PRESETS[self.weights] if isinstance(self.weights, str) else tuple(self.weights)


def check_weights(weights: Sequence[float], trained: Sequence[str]) -> dict[str, float]:
    """The non-zero weights by attribute; an error when one falls on an attribute the APM was not
    trained on (its output there means nothing, so the reward would be noise)."""
    named = {name: float(w) for name, w in zip(SCHEMA.names, weights, strict=True) if w}
    untrained = [name for name in named if name not in trained]
    if untrained:
        raise ConfigError(
            f"args.reward.weights: non-zero weight on {untrained}, which the APM was not trained on "
            f"(it predicts {', '.join(trained)}); set those weights to 0 or serve an APM trained on them"
        )
    return named


def weighted_reward(prediction: Sequence[float], weights: Mapping[str, float]) -> float:
    """sum(weight x predicted attribute), the prediction in SCHEMA.names order."""
    return sum(w * float(prediction[SCHEMA.index(name)]) for name, w in weights.items())


class SplitError(ValueError):
    """A query or prompt that the actor's chat template cannot have written."""


@dataclass(frozen=True)
class ChatSplitter:
    """Splits text that a chat template rendered back into its turns.

    The delimiters come from rendering sentinel messages: `head` before the first user message,
    `user_to_assistant` and `assistant_to_user` between turns, `generation` after the last user
    message (the assistant header of `add_generation_prompt=True`). With a system message,
    `system_head` and `system_to_user` replace `head`.
    """

    head: str
    user_to_assistant: str
    assistant_to_user: str
    generation: str
    system_head: str | None
    system_to_user: str | None
    strip: tuple[str, ...]  # special tokens a decoded query may carry at its ends (bos, eos, pad)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatSplitter:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"args.reward.chat_template_from: tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} "
                "has no chat template; name the actor's tokenizer (a folder or Hub id)"
            )
        sys_, u1, a1, u2 = _SENTINELS

        def render(messages: list[dict[str, str]]) -> str:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

        three = render(
            [
                {"role": "user", "content": u1},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": u2},
            ]
        )
        head, rest = three.split(u1, 1)
        user_to_assistant, rest = rest.split(a1, 1)
        assistant_to_user, generation = rest.split(u2, 1)
        one = render([{"role": "user", "content": u1}])
        if one != head + u1 + generation:
            raise ConfigError(
                "args.reward.chat_template_from: the chat template renders one user message differently "
                "from the first of three, so its delimiters cannot be learnt; give another template"
            )
        system_head = system_to_user = None
        try:
            with_system = render([{"role": "system", "content": sys_}, {"role": "user", "content": u1}])
        except Exception:  # noqa: BLE001 - templates that refuse a system message (Gemma's)
            with_system = ""
        if sys_ in with_system:
            system_head, rest = with_system.split(sys_, 1)
            system_to_user = rest.split(u1, 1)[0]
        specials = [getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")]
        strip = tuple(dict.fromkeys(s for s in specials if isinstance(s, str) and s))
        return cls(head, user_to_assistant, assistant_to_user, generation, system_head, system_to_user, strip)

    def turns(self, prompt: str) -> tuple[list[Turn], str | None]:
        """(turns, system) of a rendered prompt that ends with the generation header."""
        if not prompt.endswith(self.generation):
            raise SplitError(f"does not end with the actor template's assistant header {self.generation!r}")
        body = prompt[: len(prompt) - len(self.generation)]
        system = None
        heads: list[tuple[str, str | None]] = [(self.head, None)]
        if self.system_head is not None and self.system_to_user is not None:
            heads.insert(0, (self.system_head, self.system_to_user))
        for head, to_user in heads:
            start = _find_prefix(body, head, self.strip)
            if start is None:
                continue
            body = body[start:]
            if to_user is not None:
                if to_user not in body:
                    continue
                system, body = body.split(to_user, 1)
            break
        else:
            raise SplitError(f"does not start with the actor template's header {self.head!r}")
        texts: list[str] = []
        while True:
            user, found, rest = body.partition(self.user_to_assistant)
            texts.append(user)
            if not found:
                break
            assistant, found, body = rest.partition(self.assistant_to_user)
            if not found:
                raise SplitError(
                    "an assistant turn is not followed by a user turn before the generation header"
                )
            texts.append(assistant)
        roles = ["User", "Assistant"]
        return [Turn(roles[i % 2], text) for i, text in enumerate(texts)], system

    def split(self, query: str, prompt: str | None = None) -> tuple[list[Turn], str]:
        """(the prompt's turns, the response) of one OpenRLHF query. The prompt is `prompt` when
        given (the query must start with it), else everything up to the last assistant header."""
        if prompt is not None:
            at = query.find(prompt)
            if at < 0 or not _only_tokens(query[:at], self.strip):
                raise SplitError("the query does not start with its prompt")
            response = query[at + len(prompt) :]
        else:
            at = query.rfind(self.generation)
            if at < 0:
                raise SplitError(f"no assistant header {self.generation!r} in the query")
            prompt, response = query[: at + len(self.generation)], query[at + len(self.generation) :]
        turns, _ = self.turns(prompt)
        return turns, _strip_end(response, self.strip)


def _only_tokens(text: str, tokens: Sequence[str]) -> bool:
    """True when `text` is a run of `tokens` (left padding, bos), or empty."""
    while text:
        token = next((t for t in tokens if text.startswith(t)), None)
        if token is None:
            return False
        text = text[len(token) :]
    return True


def _find_prefix(text: str, head: str, tokens: Sequence[str]) -> int | None:
    """Where `head` starts in `text` when only padding / bos tokens come before it (None if not)."""
    at = text.find(head) if head else 0
    if at < 0:
        return None
    if _only_tokens(text[:at], tokens):
        return at + len(head)
    return None


def _strip_end(response: str, tokens: Sequence[str]) -> str:
    """The response without the eos and padding that follow it in a decoded sequence."""
    changed = True
    while changed and response:
        changed = False
        for token in tokens:
            if response.endswith(token):
                response, changed = response[: -len(token)], True
    return response
