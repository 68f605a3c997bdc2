"""Attribute-conditioned SFT examples: token ids and labels with the NeMo-Aligner masking rules.

Like nanochat's `render_conversation`, one pass renders a conversation into pieces of text, each
marked trained or not, and tokenizes it piece by piece, so the loss mask is exact by construction
(no search for the response inside a tokenized string). Labels are the token ids on trained
positions and `IGNORE_INDEX` (-100) elsewhere; Hugging Face causal LMs shift them by one inside
the loss. Trained: every assistant response and the end-of-turn marker right after it, so the
model learns to stop. Not trained: the system text, user turns, assistant headers and attribute
lines, and template glue. No BOS is added: each template's first token (`<extra_id_0>` or the
chat template's own opener, `<|im_start|>` for SmolLM2) starts every sequence.

Two templates (`SFTDataConfig.template`):

- `nemo`: the NeMo-Aligner SteerLM template of `helpsteer_core.conversation`,
  `<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{prompt}\\n<extra_id_1>Assistant\\n`
  `<extra_id_2>{attributes}\\n{response}\\n<extra_id_1>`; trained: `{response}\\n<extra_id_1>`.
  The three `<extra_id_*>` markers must be single special tokens: call
  `prepare_tokenizer_for_template` first (it adds them and resizes the model's embeddings).
- `chat`: the tokenizer's own chat template. A system message is always sent (`config.system`,
  possibly empty), so templates that insert a default system prompt when none is given
  (SmolLM2's "You are a helpful AI assistant named SmolLM...") never do. The attribute line is
  the first line of each conditioned assistant message, `Attributes: {attributes}\\n`, followed
  by the response: per turn, right before the response, as `<extra_id_2>` is in the NeMo
  template (a system-message line could hold only one set of attributes per conversation).
  For SmolLM2 an assistant turn reads
  `<|im_start|>assistant\\nAttributes: helpfulness:4,...\\n{response}<|im_end|>\\n`;
  trained: `{response}<|im_end|>` (the tokenizer's eos must directly follow the message content).
  Pieces come from rendering the message prefixes one by one; a template whose rendering of a
  prefix is not a prefix of the whole conversation is rejected with an error.

Every assistant turn is trained on its own attributes; an assistant turn whose attributes are
None (e.g. the earlier assistant turns of a HelpSteer2 multi-turn prompt) is trained
unconditioned, with no attribute line.

Truncation (`build_example`, `config.max_length` tokens at most). The example is split into the
context (everything before the final assistant turn: system, earlier turns, the last user turn),
the final header (role header plus attribute line) and the final response (with its end marker).
1. Fits: nothing is cut.
2. Otherwise the context is trimmed from the LEFT, token by token, until the example fits; kept
   context tokens keep their labels (a partly kept earlier response stays trained on what is left).
3. If header + response alone are still too long, the whole context is gone and the response's
   END is cut (its start is kept; the end marker is lost, so that example does not teach stopping).
The final header and attribute line are never cut; a `max_length` that cannot hold the header
plus one response token is an error. `SFTStats` counts what was cut, so nothing goes silently.

Packing (`pack_examples`) concatenates whole examples greedily; `position_ids` restart at 0 for
each example. Attention still crosses example boundaries unless the model masks attention by
`position_ids` (flash-attention 2 with packed sequences does; eager/SDPA on CPU do not).

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator
from torch import Tensor

from helpsteer_core.attributes import STEERLM, AttributeSchema, format_attributes, level_words_problem
from helpsteer_core.config import ConfigError, StrictModel
from helpsteer_core.conversation import (
    LABEL_TOKEN,
    SPECIAL_TOKENS,
    SYSTEM_TOKEN,
    TURN_TOKEN,
    Conversation,
    ConversationFormatError,
    Turn,
    assistant_header,
    conversation_from_row,
    render_segments,
)
from helpsteer_core.readers import SourceError

IGNORE_INDEX = -100
CHAT_ATTRIBUTE_PREFIX = "Attributes: "
Template = Literal["nemo", "chat"]
AttributeSource = Literal["human", "apm", "prefer_human", "apm_quantile"]


class SFTDataConfig(StrictModel):
    """How conversations become SFT examples (one section of the SFT stage config)."""

    # nemo: the NeMo-Aligner SteerLM template; chat: the tokenizer's chat template (module docstring).
    template: Template = "nemo"
    # Most tokens per example (and per packed sequence); longer examples are cut as documented.
    max_length: int = Field(default=1024, gt=1)
    # The system text of every conversation ("" is an empty system turn, never a default prompt).
    system: str = ""
    # Concatenate examples into sequences of up to max_length tokens (`pack_examples`).
    pack: bool = False
    # The attributes the attribute line carries, as in the HelpSteer paper's ablations: the others
    # are left out of it in training and at inference (serve, evaluate, the exported chat template
    # all render through this section). None: every attribute a row or request has.
    condition_on: list[str] | None = None

    @field_validator("condition_on")
    @classmethod
    def _known_attributes(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if not names:
            allowed = ", ".join(STEERLM.names)
            raise ValueError(f"is empty; allowed: null (every attribute) or some of {allowed}")
        for name in names:
            if name not in STEERLM.names:
                raise ValueError(f"unknown attribute {name!r}; allowed: {', '.join(STEERLM.names)}")
        if len(set(names)) < len(names):
            raise ValueError(f"names an attribute twice: {names}")
        return [name for name in STEERLM.names if name in names]  # schema order, as rendered

    # Levels said in words on the attribute line (template chat only), e.g. complexity: [very simple,
    # simple, moderate, advanced, expert] renders `complexity:very simple` for level 0: a form the
    # pretrained model already reads, where a digit among constant ones is learnt only after epochs
    # (docs/results.md). Applies in training and at inference alike; None: digits.
    level_words: dict[str, list[str]] | None = None

    @field_validator("level_words")
    @classmethod
    def _words_per_level(cls, words: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for name, names in (words or {}).items():
            problem = level_words_problem(name, names, STEERLM)
            if problem:
                raise ValueError(problem)
        return words or None

    @model_validator(mode="after")
    def _words_need_the_chat_template(self) -> SFTDataConfig:
        if self.level_words and self.template != "chat":
            raise ValueError(
                f"level_words needs template 'chat' (the attribute line of template {self.template!r} "
                "is NeMo's digits)"
            )
        return self

    @model_serializer(mode="wrap")
    def _leave_out_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # level_words came later: unset, it stays out of the dump, so the cache keys and run
        # identities that read this section (answers, train_sft, evaluate) are the ones they were.
        dump: dict[str, Any] = handler(self)
        if self.level_words is None:
            dump.pop("level_words", None)
        return dump


@dataclass
class SFTStats:
    """Counts of what building examples did; pass one in to collect them (e.g. for MLflow)."""

    examples: int = 0
    prompt_trimmed: int = 0  # examples whose context lost tokens from the left
    prompt_tokens_trimmed: int = 0
    response_cut: int = 0  # examples whose final response lost its end
    response_tokens_cut: int = 0
    trained_tokens: int = 0
    repeated_rows: int = 0  # rows a repeat rule (sft.repeat) matched
    repeated_examples: int = 0  # the extra examples those rows added


@dataclass(frozen=True)
class _Rendered:
    """A conversation as pieces: context (text, trained), final header, final response."""

    context: list[tuple[str, bool]]
    header: str
    response: str  # the final response plus its end-of-turn marker


def prepare_tokenizer_for_template(
    tokenizer: Any, model: Any = None, template: Template = "nemo"
) -> list[str]:
    """Make `tokenizer` (and `model`) ready for `template`; return the tokens that were added.

    nemo: adds `<extra_id_0/1/2>` as extra special tokens where missing (so they are never split
    and always one id each). With `model`, grows its token embeddings to `len(tokenizer)` when they
    are smaller (new rows get transformers' mean initialisation) and adds `<extra_id_1>`, the
    trained end-of-turn marker, to the generation config's eos ids, so `generate` stops there.
    chat: checks that the tokenizer has a chat template and an eos token; adds nothing.
    """
    if template == "chat":
        _check_chat_tokenizer(tokenizer)
        return []
    if template != "nemo":
        raise ConfigError(f"template {template!r}; allowed: nemo, chat")
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    _check_nemo_tokenizer(tokenizer)
    if model is not None:
        # num_embeddings, not weight.shape: under DeepSpeed ZeRO-3 the local weight is an empty shard.
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            eos = generation.eos_token_id
            ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            turn_id = tokenizer.convert_tokens_to_ids(TURN_TOKEN)
            if turn_id not in ids:
                generation.eos_token_id = ids + [turn_id]
    return missing


def end_of_turn_id(tokenizer: Any, template: Template) -> int:
    """The id of the trained end-of-turn marker: `<extra_id_1>` (nemo) or the eos (chat)."""
    if template == "nemo":
        _check_nemo_tokenizer(tokenizer)
        return int(tokenizer.convert_tokens_to_ids(TURN_TOKEN))
    _check_chat_tokenizer(tokenizer)
    return int(tokenizer.eos_token_id)


def _check_nemo_tokenizer(tokenizer: Any) -> None:
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(
                f"the nemo template needs {token} as one special token, the tokenizer splits it into "
                f"{len(ids)}; call prepare_tokenizer_for_template(tokenizer, model) first"
            )


def _check_chat_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "template 'chat' needs a tokenizer with a chat template; this one has none (use 'nemo')"
        )
    if tokenizer.eos_token is None:
        raise ConfigError(
            "template 'chat' needs the tokenizer's eos token as the end-of-turn marker; it has none"
        )


def _render_nemo(conversation: Conversation, schema: AttributeSchema) -> _Rendered:
    segments = render_segments(conversation, schema)
    header = assistant_header(conversation.turns[-1].attributes, schema)
    # The last segment is the final response + "\n<extra_id_1>"; the one before ends with its header.
    # Splitting there cuts right before the special token <extra_id_1>, where a tokenizer splits
    # anyway, so the ids are the same as tokenizing the segment whole.
    before, response = segments[-2], segments[-1]
    if not response[1] or before[1] or not before[0].endswith(header):
        raise RuntimeError("render_segments changed shape: cannot find the final assistant header")
    context = segments[:-2] + [(before[0][: len(before[0]) - len(header)], False)]
    return _Rendered(context, header, response[0])


def _chat_attribute_line(
    attributes: Mapping[str, int] | None, schema: AttributeSchema, words: Mapping[str, Sequence[str]] | None
) -> str:
    if attributes is None:
        return ""
    return f"{CHAT_ATTRIBUTE_PREFIX}{format_attributes(attributes, schema, words)}\n"


def _render_chat(
    conversation: Conversation, tokenizer: Any, schema: AttributeSchema, config: SFTDataConfig
) -> _Rendered:
    _check_chat_tokenizer(tokenizer)
    eos = tokenizer.eos_token
    messages: list[dict[str, str]] = [{"role": "system", "content": conversation.system}]
    for turn in conversation.turns:
        if turn.role == "User":
            messages.append({"role": "user", "content": turn.text})
        else:
            line = _chat_attribute_line(turn.attributes, schema, config.level_words)
            messages.append({"role": "assistant", "content": line + turn.text})
    pieces: list[tuple[str, bool]] = []
    done = ""
    header = response = ""
    for i, message in enumerate(messages):
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(done):
            raise ConfigError(
                "template 'chat': the chat template renders a conversation prefix differently from the "
                f"whole conversation (message {i + 1}); it cannot be tokenized piece by piece, use 'nemo'"
            )
        span, done = text[len(done) :], text
        if message["role"] != "assistant":
            pieces.append((span, False))
            continue
        content = message["content"]
        # The content is where it is directly followed by the eos (it may also occur in the glue).
        start = span.find(content + eos)
        end = start + len(content)
        if start < 0:
            raise ConfigError(
                f"template 'chat': assistant message {i + 1} is not followed by the eos {eos!r} in the "
                "rendered chat template, so the end-of-turn marker cannot be trained; use 'nemo'"
            )
        line = _chat_attribute_line(conversation.turns[i - 1].attributes, schema, config.level_words)
        header = span[: start + len(line)]
        response = span[start + len(line) : end + len(eos)]
        if i < len(messages) - 1:  # earlier turns: trained only with their own attributes
            trained = conversation.turns[i - 1].attributes is not None
            pieces += [(header, False), (response, trained), (span[end + len(eos) :], False)]
    # The final turn's header and response are kept apart; its glue after the eos is dropped.
    return _Rendered(_merge(pieces), header, response)


def _merge(pieces: Sequence[tuple[str, bool]]) -> list[tuple[str, bool]]:
    merged: list[tuple[str, bool]] = []
    for text, trained in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _render(
    conversation: Conversation, tokenizer: Any, config: SFTDataConfig, schema: AttributeSchema
) -> _Rendered:
    if not conversation.turns or conversation.turns[-1].role != "Assistant":
        raise ConversationFormatError("an SFT example must end with an Assistant turn (the trained response)")
    if config.condition_on is not None:
        kept = config.condition_on
        conversation = replace(
            conversation,
            turns=tuple(
                turn
                if turn.attributes is None
                else replace(turn, attributes={k: v for k, v in turn.attributes.items() if k in kept})
                for turn in conversation.turns
            ),
        )
    if config.template == "nemo":
        _check_nemo_tokenizer(tokenizer)
        return _render_nemo(conversation, schema)
    return _render_chat(conversation, tokenizer, schema, config)


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _tokenize_rendered(
    tokenizer: Any, rendered: _Rendered
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(context ids, context labels, header ids, response ids): one tokenizer call per piece."""
    texts = [text for text, _ in rendered.context] + [rendered.header, rendered.response]
    ids = _tokenize(tokenizer, texts)
    context_ids: list[int] = []
    context_labels: list[int] = []
    for (_, trained), piece in zip(rendered.context, ids, strict=False):
        context_ids += piece
        context_labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return context_ids, context_labels, ids[-2], ids[-1]


def build_example(
    conversation: Conversation,
    tokenizer: Any,
    config: SFTDataConfig,
    schema: AttributeSchema = STEERLM,
    stats: SFTStats | None = None,
) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` for one conversation ending with the trained assistant response.

    Labels are IGNORE_INDEX except on assistant responses and their end-of-turn markers. Longer
    than `config.max_length`: the context is trimmed from the left, then the final response's end
    is cut; the final header and attribute line are always kept (module docstring). The system
    text is `conversation.system`; `examples_from_rows` and `generation_prompt_ids` build their
    conversations with `config.system`.
    """
    rendered = _render(conversation, tokenizer, config, schema)
    context_ids, context_labels, header, response = _tokenize_rendered(tokenizer, rendered)
    budget = config.max_length - len(header)
    if budget < 1:
        raise ConfigError(
            f"max_length {config.max_length} cannot hold the final assistant header and attribute line "
            f"({len(header)} tokens) plus one response token; raise data.max_length"
        )
    keep_response = min(len(response), budget)
    keep_context = min(len(context_ids), budget - keep_response)
    first = len(context_ids) - keep_context
    input_ids = context_ids[first:] + header + response[:keep_response]
    labels = context_labels[first:] + [IGNORE_INDEX] * len(header) + response[:keep_response]
    if stats is not None:
        stats.examples += 1
        stats.prompt_trimmed += int(first > 0)
        stats.prompt_tokens_trimmed += first
        stats.response_cut += int(keep_response < len(response))
        stats.response_tokens_cut += len(response) - keep_response
        stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
    return {"input_ids": input_ids, "labels": labels}


def generation_prompt_ids(
    turns: Sequence[Turn],
    attributes: Mapping[str, int] | None,
    tokenizer: Any,
    config: SFTDataConfig,
    schema: AttributeSchema = STEERLM,
    max_new_tokens: int = 0,
) -> list[int]:
    """The ids a trained generator continues: history, the assistant header and the attribute line.

    Built by rendering the conversation with a placeholder final response and keeping what comes
    before it, so the ids are exactly the prefix `build_example` trains on. The history is trimmed
    from the left so that prompt + `max_new_tokens` fits `config.max_length` (as in training);
    the header is never cut. `attributes=None` gives an unconditioned prompt.
    """
    if not turns or turns[-1].role != "User":
        raise ConversationFormatError("a generation prompt must end with a User turn")
    placeholder = Turn("Assistant", "x", None if attributes is None else dict(attributes))
    conversation = Conversation(tuple(turns) + (placeholder,), system=config.system)
    context_ids, _, header, _ = _tokenize_rendered(
        tokenizer, _render(conversation, tokenizer, config, schema)
    )
    budget = config.max_length - max_new_tokens - len(header)
    if budget < 0:
        raise ConfigError(
            f"max_length {config.max_length} cannot hold the assistant header ({len(header)} tokens) "
            f"plus max_new_tokens {max_new_tokens}"
        )
    return context_ids[max(0, len(context_ids) - budget) :] + header


STEERABLE_MARK = "{#- helpsteer: steerable chat template -#}"
BASE_MARKS = ("{#- helpsteer: base template -#}", "{#- helpsteer: end of base template -#}")


def _jinja_attribute_line(
    schema: AttributeSchema,
    rendered: Sequence[str] | None = None,
    words: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A jinja macro `_attrs(a)`: `format_attributes(a, schema, words)` of the attributes in
    `rendered` (default: all), checking every name and value against the schema."""
    names = json.dumps(list(schema.names))
    shown = json.dumps(list(rendered if rendered is not None else schema.names))
    said = json.dumps({name: list(level) for name, level in (words or {}).items()})
    return (
        "{%- macro _attrs(a) -%}"
        "{%- for key in a -%}{%- if key not in " + names + " -%}"
        "{{ raise_exception('attribute ' ~ key ~ ' is not in the schema; allowed: "
        + ", ".join(schema.names)
        + "') }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set ns = namespace(parts=[]) -%}{%- set w = " + said + " -%}"
        "{%- for name in " + shown + " -%}{%- if a[name] is defined and a[name] is not none -%}"
        "{%- if a[name] is not integer or a[name] < "
        + str(schema.low)
        + " or a[name] > "
        + str(schema.high)
        + " -%}"
        "{{ raise_exception('attribute ' ~ name ~ ' must be an integer "
        + f"{schema.low}-{schema.high}"
        + "') }}"
        "{%- endif -%}"
        "{%- set ns.parts = ns.parts + [name ~ ':' ~ (w[name][a[name] - "
        + str(schema.low)
        + "] if name in w else a[name])] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{{- ns.parts | join(',') -}}"
        "{%- endmacro -%}"
    )


def steerable_chat_template(
    base: str | None, config: SFTDataConfig, schema: AttributeSchema = STEERLM
) -> str:
    """A chat template that renders the prompt the generator was trained on, attributes included,
    so Hugging Face-native tools steer the exported model without our code:

        tokenizer.apply_chat_template(messages, add_generation_prompt=True, attributes={"verbosity": 1})

    (vLLM: `chat_template_kwargs={"attributes": {...}}`). An assistant message may carry its own
    `attributes` (trained turns of a conversation); without any, the text is the base template's
    (`chat`) or our NeMo rendering (`nemo`), so the training code reads the same prompts through it.
    A conversation without a system message gets the trained system text (`config.system`), as
    training did. The prompt equals `generation_prompt_ids` (tests/test_sft_data.py).
    """
    macro = STEERABLE_MARK + _jinja_attribute_line(schema, config.condition_on, config.level_words)
    system = json.dumps(config.system)
    if config.template == "chat":
        if not base:
            raise ConfigError("template 'chat' needs the tokenizer's own chat template to build on")
        if base.startswith(STEERABLE_MARK):  # a model trained from an exported one: wrap its base once
            base = base.split(BASE_MARKS[0], 1)[1].split(BASE_MARKS[1], 1)[0]
        base = BASE_MARKS[0] + base + BASE_MARKS[1]
        prefix = json.dumps(CHAT_ATTRIBUTE_PREFIX)
        return (
            macro + "{%- set ns_m = namespace(msgs=[]) -%}"
            "{%- if messages[0]['role'] != 'system' -%}"
            "{%- set ns_m.msgs = [{'role': 'system', 'content': " + system + "}] -%}{%- endif -%}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'assistant' and m['attributes'] is defined "
            "and m['attributes'] is not none -%}"
            "{%- set ns_m.msgs = ns_m.msgs + [{'role': 'assistant', 'content': "
            + prefix
            + " ~ _attrs(m['attributes']) ~ '\n' ~ m['content']}] -%}"
            "{%- else -%}{%- set ns_m.msgs = ns_m.msgs + [m] -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- set messages = ns_m.msgs -%}"
            + base
            + "{%- if add_generation_prompt and attributes is defined "
            "and attributes is not none -%}{{- " + prefix + " ~ _attrs(attributes) ~ '\n' -}}{%- endif -%}"
        )
    turn, label, system_token = json.dumps(TURN_TOKEN), json.dumps(LABEL_TOKEN), json.dumps(SYSTEM_TOKEN)
    return (
        macro + "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set sys = " + system + " -%}"
        "{%- set turns = messages -%}{%- endif -%}"
        "{{- " + system_token + " ~ 'System\n' ~ sys ~ '\n' -}}"
        "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}{{- " + turn + " ~ 'User\n' ~ m['content'] ~ '\n' -}}"
        "{%- elif m['role'] == 'assistant' -%}{{- " + turn + " ~ 'Assistant\n' -}}"
        "{%- if m['attributes'] is defined and m['attributes'] is not none -%}"
        "{{- " + label + " ~ _attrs(m['attributes']) ~ '\n' -}}{%- endif -%}"
        "{{- m['content'] ~ '\n' -}}"
        "{%- else -%}"
        "{{ raise_exception('role ' ~ m['role'] ~ '; allowed: system (first), user, assistant') }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + turn + " ~ 'Assistant\n' -}}"
        "{%- if attributes is defined and attributes is not none -%}"
        "{{- " + label + " ~ _attrs(attributes) ~ '\n' -}}{%- endif -%}"
        "{%- elif turns and turns[-1]['role'] == 'assistant' -%}{{- " + turn + " -}}{%- endif -%}"
    )


def _present(value: Any) -> bool:
    """False for the ways a missing label arrives: None, NaN (pandas floats), pandas.NA."""
    if value is None:
        return False
    try:
        return not math.isnan(value)
    except TypeError:  # a string (check_value will reject it) or pandas.NA
        return type(value).__name__ != "NAType"


def _cuts(values: Sequence[float], schema: AttributeSchema) -> list[float]:
    """The cut points that split `values` into equal-count levels over the schema's range."""
    count = schema.high - schema.low + 1
    return [float(c) for c in np.quantile(np.asarray(values), [k / count for k in range(1, count)])]


def quantile_levels(
    rows: Sequence[Mapping[str, Any]], schema: AttributeSchema = STEERLM
) -> dict[str, list[float]]:
    """Per attribute with APM predictions (`apm_{name}` floats, relabel output): the cut points that
    split the rows' predictions into equal-count levels over the schema's range (4 cuts for 0..4).

    For data the APM was not trained on (the untuned generator's own answers, scored by an APM that
    saw only synthetic text) its predictions keep their order but bunch up (verbosity 1.9 for
    one-sentence answers, 4.2 for several paragraphs): rounding would leave levels no row has.
    Ranking them spreads the data over every level; level k is the k-th equal share of the rows.
    """
    levels: dict[str, list[float]] = {}
    for name in schema.names:
        values = [float(r[f"apm_{name}"]) for r in rows if _present(r.get(f"apm_{name}"))]
        if values:
            levels[name] = _cuts(values, schema)
    if not levels:
        raise SourceError(
            "attribute source 'apm_quantile': no apm_<name> column in the rows (relabel them first)"
        )
    return levels


QuantileScope = Literal["all", "prompt"]
# Where a whole answer's `answer_level` prediction is read: on the whole answer, on its version cut
# to N sentences (answers.shorter), or the mean over all its versions.
AnswerReading = Literal["whole", "mean"] | int


def answer_reading_problem(at: AnswerReading, answer_level: Sequence[str]) -> str | None:
    """What is wrong with `answer_level_at` `at` beside `answer_level`; None when nothing."""
    if isinstance(at, int) and at < 1:
        return f"answer_level_at {at}: a number of sentences (>= 1), whole or mean"
    if at != "whole" and not answer_level:
        return f"answer_level_at {at!r} needs answer_level (the attributes it reads)"
    return None


def read_answer_level(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], at: AnswerReading
) -> list[dict[str, Any]]:
    """`rows` with each whole answer's `apm_<name>` (for `names`) read `at` one of its versions
    instead (same prompt and `style`; `first_sentences` at), or as the mean over all of them.
    The APM reads length together with register: ranking every answer at one length keeps the
    register apart from where the answer stops. A whole answer without that version (it has fewer
    sentences) keeps its own prediction; shorter versions are left as they are."""
    if at == "whole" or not names:
        return [dict(r) for r in rows]
    versions: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
    for row in rows:
        versions.setdefault((row["prompt"], row["style"]), []).append(row)
    read = []
    for row in rows:
        if _present(row.get("first_sentences")):
            read.append(dict(row))
            continue
        found = versions[(row["prompt"], row["style"])]
        new = dict(row)
        for name in names:
            column = f"apm_{name}"
            if at == "mean":
                values = [float(v[column]) for v in found if _present(v.get(column))]
                new[column] = float(np.mean(values)) if values else row.get(column)
            else:
                version = next((v for v in found if v.get("first_sentences") == at), None)
                if version is not None and _present(version.get(column)):
                    new[column] = float(version[column])
        read.append(new)
    return read


def apm_levels(
    rows: Sequence[Mapping[str, Any]],
    schema: AttributeSchema = STEERLM,
    scope: QuantileScope = "all",
    answer_level: Sequence[str] = (),
    cuts: Mapping[str, Sequence[float]] | None = None,
    answer_at: AnswerReading = "whole",
) -> list[dict[str, int]]:
    """Each row's level per attribute for `attribute_source: apm_quantile`: its APM prediction
    ranked into equal-count levels (`quantile_levels`' cut points) among the rows of its scope.
    `cuts` fixes the cut points of the attributes it names (another model's scale, `LevelScale`):
    those are placed by them instead of ranked.

    scope "all" ranks over every row; "prompt" over the rows of the same prompt, so that the levels
    say how one prompt's answers differ (shorter, simpler) without the spread between prompts (a
    question about tax law reads as more complex than one about pets in every register).
    `answer_level` names attributes that belong to a whole answer rather than to where it stops:
    they are ranked over whole answers only (`first_sentences` None) and each shorter version
    (`helpsteer_core.answers.shorter_rows`) takes its whole answer's level, found by prompt and
    `style`. A version cut to one sentence keeps its answer's register. `answer_at` says where a
    whole answer's prediction is read before it is ranked (`read_answer_level`).
    """
    unknown = [n for n in answer_level if n not in schema.names]
    if unknown:
        raise ConfigError(f"answer_level: {unknown}; allowed: {', '.join(schema.names)}")
    if answer_level and rows and not {"first_sentences", "style"} <= set(rows[0]):
        raise SourceError(
            f"answer_level {list(answer_level)} needs the `first_sentences` and `style` columns of "
            "generate_answers' rows; these rows have none (use answer_level: [] for other data)"
        )
    problem = answer_reading_problem(answer_at, answer_level)
    if problem:
        raise ConfigError(problem)
    quantile_levels(rows, schema)  # raises when no row has a prediction
    if answer_at != "whole":
        rows = read_answer_level(rows, answer_level, answer_at)
    groups: dict[Any, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row["prompt"] if scope == "prompt" else None, []).append(index)
    chosen: list[dict[str, int]] = [{} for _ in rows]
    whole: dict[tuple[str, str], int] = {}
    for index, row in enumerate(rows):
        if answer_level and not _present(row.get("first_sentences")):
            whole[(row["prompt"], row["style"])] = index
    for members in groups.values():
        for name in schema.names:
            column = f"apm_{name}"
            pool = [
                i
                for i in members
                if _present(rows[i].get(column))
                and (name not in answer_level or not _present(rows[i].get("first_sentences")))
            ]
            if not pool:
                continue
            fixed = (cuts or {}).get(name)
            bounds = (
                list(fixed) if fixed is not None else _cuts([float(rows[i][column]) for i in pool], schema)
            )
            for i in pool:
                chosen[i][name] = schema.low + bisect.bisect_right(bounds, float(rows[i][column]))
    for index, row in enumerate(rows):
        if not answer_level or not _present(row.get("first_sentences")):
            continue
        answer = whole.get((row["prompt"], row["style"]))
        if answer is None:
            raise SourceError(
                f"row {index}: a shorter version (first_sentences {row['first_sentences']}) whose "
                f"whole answer (same prompt, style {row['style']!r}) is not among the rows"
            )
        for name in answer_level:
            if name in chosen[answer]:
                chosen[index][name] = chosen[answer][name]
    return chosen


def choose_attributes(
    row: Mapping[str, Any],
    schema: AttributeSchema = STEERLM,
    source: AttributeSource = "prefer_human",
    levels: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """The attribute values one row is conditioned on, per attribute of `schema`.

    human: the `{name}` columns; apm: the APM's rounded `apm_{name}_int` columns (relabel output);
    prefer_human: the human value where present, else the APM's; apm_quantile: the row's `levels`
    (its entry of `apm_levels` over the training rows).
    Missing values (None, NaN) are left out; every value is checked against the schema, never
    clamped.
    """
    if source not in ("human", "apm", "prefer_human", "apm_quantile"):
        raise ConfigError(f"attribute source {source!r}; allowed: human, apm, prefer_human, apm_quantile")
    if source == "apm_quantile":
        if levels is None:
            raise ConfigError("attribute source 'apm_quantile' needs the row's levels (apm_levels)")
        return {name: schema.check_value(name, value) for name, value in levels.items()}
    chosen: dict[str, int] = {}
    for name in schema.names:
        human, apm = name, f"apm_{name}_int"
        columns = [human] if source == "human" else [apm] if source == "apm" else [human, apm]
        for column in columns:
            value: Any = row.get(column)
            if _present(value):
                scalar = value.item() if hasattr(value, "item") else value  # numpy scalars (int8 columns)
                chosen[name] = schema.check_value(name, scalar)
                break
    return chosen


def examples_from_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: SFTDataConfig,
    schema: AttributeSchema = STEERLM,
    attribute_source: AttributeSource | Sequence[AttributeSource] = "prefer_human",
    stats: SFTStats | None = None,
    levels: Sequence[Mapping[str, int] | None] | None = None,
    fixed: Mapping[str, int] | None = None,
) -> list[dict[str, list[int]]]:
    """SFT examples for filter / relabel output rows (`prompt`, `response`, attribute columns).

    A HelpSteer2 multi-turn prompt becomes its turns (earlier assistant turns are context: they carry
    no labels of their own, so they are not trained, as in NeMo-Aligner); the
    response is the final, trained turn, conditioned on `choose_attributes(row, schema, source)`.
    A row with no attribute value from that source is an error naming the row, not an
    unconditioned example: it means the wrong source or unrelabelled data. `fixed` values replace
    the source's for their attributes in every row (checked against the schema by the caller).
    `attribute_source` is one for every row, or one per row (rows of several sources, each
    with its own). `levels`: for apm_quantile rows, each row's levels (`apm_levels`).
    """
    if levels is not None and len(levels) != len(rows):
        raise ValueError(f"levels for {len(levels)} rows, but {len(rows)} rows")
    sources = [attribute_source] * len(rows) if isinstance(attribute_source, str) else list(attribute_source)
    if len(sources) != len(rows):
        raise ValueError(f"attribute sources for {len(sources)} rows, but {len(rows)} rows")
    examples = []
    for index, row in enumerate(rows):
        row_levels = None if levels is None else levels[index]
        source = sources[index]
        attributes = choose_attributes(row, schema, source, row_levels) | dict(fixed or {})
        if not attributes:
            raise SourceError(
                f"row {index}: no attribute values from source {source!r} (columns "
                f"{', '.join(schema.names[:2])}, ... or apm_<name>_int); "
                "relabel the data or pick another source"
            )
        try:
            conversation = conversation_from_row(
                row["prompt"], row["response"], attributes, system=config.system
            )
        except (KeyError, ConversationFormatError) as exc:
            raise SourceError(f"row {index}: {exc}") from exc
        examples.append(build_example(conversation, tokenizer, config, schema, stats))
    return examples


class RowRepeat(StrictModel):
    """Training rows that appear `times` times an epoch: those whose value in every `where` column
    is one of the listed values (null matches a missing value). How a few rows get many epochs
    while the rest get one: a knob decided in an answer's first tokens needs epochs over rows
    that differ only there (docs/results.md, issue 13)."""

    where: dict[str, list[Any]] = Field(min_length=1)
    times: int = Field(ge=2)


def row_repeats(
    rows: Sequence[Mapping[str, Any]], rules: Sequence[RowRepeat], source: str = ""
) -> tuple[list[int], list[int]]:
    """(how many times each row appears an epoch, how many rows each rule took). The first rule a
    row matches wins; a row no rule matches appears once. A rule naming a column the rows lack is
    a ConfigError naming the rule, the column and the columns there are; one that matches no row
    takes 0 rows (the caller says so: generated data may lack a style)."""
    counts = [1] * len(rows)
    taken = [0] * len(rules)
    columns = sorted(set().union(*rows))  # rows of several folders may differ in their columns
    where = f" in {source}" if source else ""
    for number, rule in enumerate(rules):
        for column in rule.where:
            if column not in columns:
                raise ConfigError(
                    f"sft.repeat[{number}].where: no column {column!r}{where}; columns: {', '.join(columns)}"
                )
        for index, row in enumerate(rows):
            if counts[index] == 1 and all(
                row.get(column) in allowed for column, allowed in rule.where.items()
            ):
                counts[index] = rule.times
                taken[number] += 1
    return counts, taken


def column_values(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], most: int = 20
) -> dict[str, list[str]]:
    """The distinct values of each of `columns` in `rows` (as text, sorted, at most `most`)."""
    return {column: sorted({str(row.get(column)) for row in rows})[:most] for column in columns}


def pack_examples(
    examples: Sequence[Mapping[str, Sequence[int]]], max_length: int
) -> list[dict[str, list[int]]]:
    """Concatenate examples, in order, into sequences of at most `max_length` tokens.

    Greedy: an example goes into the current sequence when it fits, else it starts a new one.
    Each sequence has `input_ids`, `labels` (each example's own) and `position_ids` restarting at
    0 per example. Each example's first label is IGNORE_INDEX: in a packed row it would be
    predicted from the previous example's last token (the first token is never trained anyway).
    Attention crosses example boundaries unless the model masks by position_ids (module docstring).
    """
    packs: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for index, example in enumerate(examples):
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if len(ids) != len(labels):
            raise ValueError(f"example {index}: {len(ids)} input_ids but {len(labels)} labels")
        if len(ids) > max_length:
            raise ValueError(
                f"example {index} has {len(ids)} tokens > max_length {max_length}; build examples with "
                "the same max_length so they are truncated first"
            )
        if not ids:
            continue
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            packs.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + labels[1:]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        packs.append(current)
    return packs


def collate_sft(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """A right-padded batch: input_ids (pad_id), labels (IGNORE_INDEX), attention_mask, and
    position_ids (0 on padding) when the examples are packed. Shapes: (batch, longest)."""
    if not examples:
        raise ValueError("collate_sft: no examples")
    width = max(len(example["input_ids"]) for example in examples)
    packed = all("position_ids" in example for example in examples)

    def pad(values: Sequence[int], fill: int) -> list[int]:
        return list(values) + [fill] * (width - len(values))

    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples], dtype=torch.long),
        "labels": torch.tensor([pad(e["labels"], IGNORE_INDEX) for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor(
            [pad([1] * len(e["input_ids"]), 0) for e in examples], dtype=torch.long
        ),
    }
    if packed:
        batch["position_ids"] = torch.tensor([pad(e["position_ids"], 0) for e in examples], dtype=torch.long)
    return batch


def trained_token_count(labels: Sequence[int]) -> int:
    """Tokens of one example that carry loss: its labels after the causal shift (the first label
    is never predicted), not IGNORE_INDEX."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def trained_mask(labels: Tensor) -> Tensor:
    """(batch, seq) bool: the positions whose logits predict a trained token (the next label is set).

    Passed as a model's `logits_to_keep`, the language-model head runs on these positions only:
    prompt, attribute line and padding never reach the vocabulary projection, which on a small
    model is a fifth of the training step's compute.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy over trained positions; labels (batch, seq) with IGNORE_INDEX
    on masked and padded positions, which contribute nothing. Logits are either (batch, seq, vocab),
    every position, or (kept, vocab), the positions of `trained_mask(labels)` in row-major order (a
    model called with `logits_to_keep=trained_mask(labels)`); the two give the same sum.

    A sum, not a mean: the training step divides by one constant for the whole run (the mean
    trained tokens per global batch), so the gradient does not depend on how a batch is cut into
    micro-batches and workers, and every trained token weighs the same.
    """
    targets = labels[:, 1:].to(logits.device)
    if logits.dim() == 2:
        kept = targets[targets != IGNORE_INDEX]
        return torch.nn.functional.cross_entropy(logits.float(), kept, reduction="sum")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (batch * (seq - 1), vocab)
    return torch.nn.functional.cross_entropy(
        shifted, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


__all__ = [
    "CHAT_ATTRIBUTE_PREFIX",
    "IGNORE_INDEX",
    "SFTDataConfig",
    "SFTStats",
    "build_example",
    "apm_levels",
    "choose_attributes",
    "collate_sft",
    "end_of_turn_id",
    "examples_from_rows",
    "generation_prompt_ids",
    "pack_examples",
    "prepare_tokenizer_for_template",
    "token_loss_sum",
    "trained_mask",
    "trained_token_count",
]
