"""POST /get_reward: OpenRLHF's remote reward protocol over the APM (serve.reward, serve.api).

Queries are built exactly as OpenRLHF builds them: the actor's `apply_chat_template(messages,
tokenize=False, add_generation_prompt=True)`, the sampled response, the eos, and the padding a
batch decode leaves (left and right). The templates are SmolLM2's own (the packaged model) and
Meta's Llama 3 template, rendered by transformers. The HTTP path through the real Serve app is in
tests/test_serve.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from test_serve_units import LengthAPM, WordsGenerator, make_sft_folder
from test_sft_data import _train_tiny_tokenizer

from helpsteer_core.attributes import STEERLM
from helpsteer_core.config import ConfigError
from helpsteer_core.conversation import Turn, join_prompt_turns
from serve.api import Frontend, Reward, Settings
from serve.protocol import APIError, LimitArgs
from serve.reward import REWARD_PRESETS, ChatSplitter, RewardArgs, SplitError, check_weights, weighted_reward
from serve.steerable import SteerablePrompts

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json), verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "What is a tide?"},
    {"role": "assistant", "content": "The rise and fall of the sea."},
    {"role": "user", "content": "Why twice a day?"},
]
RESPONSE = "Because the Earth turns through two bulges of water,\none facing the Moon and one opposite."


@pytest.fixture
def smollm2(smollm2_base: Any) -> Any:
    return smollm2_base


@pytest.fixture(scope="module")
def steerable(tiny_generator: Path, tmp_path_factory: pytest.TempPathFactory) -> SteerablePrompts:
    return SteerablePrompts.load(make_sft_folder(tiny_generator, tmp_path_factory.mktemp("reward") / "sft"))


@pytest.fixture(scope="module")
def llama3() -> Any:
    tokenizer = copy.deepcopy(_train_tiny_tokenizer())
    tokenizer.chat_template = LLAMA3
    return tokenizer


def openrlhf_query(tokenizer: Any, messages: list[dict[str, str]], response: str) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF sends them: the templated prompt, and the batch-decoded sequence
    of prompt and response (left padding, the eos, right padding, special tokens kept)."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    query = tokenizer.decode([pad, pad] + ids + [pad], skip_special_tokens=False)
    return query, prompt


@pytest.mark.parametrize("template", ["smollm2", "llama3"])
@pytest.mark.parametrize("with_prompts", [True, False])
def test_a_query_splits_back_into_the_conversation_and_the_response(
    template: str, with_prompts: bool, request: pytest.FixtureRequest
):
    tokenizer = request.getfixturevalue(template)
    splitter = ChatSplitter.from_tokenizer(tokenizer)
    query, prompt = openrlhf_query(tokenizer, CONVERSATION, RESPONSE)
    turns, response = splitter.split(query, prompt if with_prompts else None)
    assert response == RESPONSE
    assert turns == [
        Turn("User", "What is a tide?"),
        Turn("Assistant", "The rise and fall of the sea."),
        Turn("User", "Why twice a day?"),
    ]


@pytest.mark.parametrize("template", ["smollm2", "llama3"])
def test_a_system_message_is_not_a_turn(template: str, request: pytest.FixtureRequest):
    tokenizer = request.getfixturevalue(template)
    messages = [{"role": "system", "content": "Be terse."}, *CONVERSATION[:1]]
    query, prompt = openrlhf_query(tokenizer, messages, "Water moving.")
    turns, response = ChatSplitter.from_tokenizer(tokenizer).split(query, prompt)
    assert turns == [Turn("User", "What is a tide?")] and response == "Water moving."
    assert ChatSplitter.from_tokenizer(tokenizer).turns(prompt)[1] == "Be terse."


def test_text_the_template_did_not_write_is_refused(smollm2: Any):
    splitter = ChatSplitter.from_tokenizer(smollm2)
    query, prompt = openrlhf_query(smollm2, CONVERSATION, RESPONSE)
    with pytest.raises(SplitError, match="does not start with its prompt"):
        splitter.split(query, prompt.replace("tide", "wave"))
    with pytest.raises(SplitError, match="no assistant header"):
        splitter.split("What is a tide? The sea.")
    with pytest.raises(SplitError, match="does not start with the actor template's header"):
        splitter.split("Some preamble. " + query)


def test_a_tokenizer_without_a_chat_template_is_a_config_error(llama3: Any):
    bare = copy.deepcopy(llama3)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        ChatSplitter.from_tokenizer(bare)


def test_weights_presets_and_checks():
    assert RewardArgs().vector() == REWARD_PRESETS["llama3-70b-rewardbench"]
    assert REWARD_PRESETS["nemotron-4-340b-reward"][4:] == (0.3, 0.74, 0.46, 0.47, -0.33)
    with pytest.raises(ValueError, match="allowed: llama3-70b-rewardbench, nemotron-4-340b-reward"):
        RewardArgs(weights="best")
    with pytest.raises(ValueError, match="give 9, in the order quality, toxicity"):
        RewardArgs(weights=[1.0, 2.0])
    helpsteer = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    weights = check_weights(RewardArgs().vector(), helpsteer)
    assert weights == {
        "helpfulness": 0.65,
        "correctness": 0.8,
        "coherence": 0.45,
        "complexity": 0.55,
        "verbosity": -0.4,
    }
    with pytest.raises(
        ConfigError, match=r"non-zero weight on \['quality'\], which the APM was not trained on"
    ):
        check_weights([1.0] + [0.0] * 8, helpsteer)
    prediction = [9.0] * 4 + [4.0, 3.0, 4.0, 2.0, 1.0]
    assert weighted_reward(prediction, weights) == pytest.approx(
        0.65 * 4 + 0.8 * 3 + 0.45 * 4 + 0.55 * 2 - 0.4
    )


class RecordingAPM(LengthAPM):
    """LengthAPM (verbosity = words) that records what it was asked to score."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str]]] = []

    async def score(self, prompt: str, responses: list[str]) -> list[list[float]]:
        self.seen.append((prompt, list(responses)))
        return await super().score(prompt, responses)


def _frontend(prompts: SteerablePrompts, tokenizer: Any, apm: Any) -> Frontend:
    weights = check_weights(REWARD_PRESETS["llama3-70b-rewardbench"], apm.trained)
    limits = LimitArgs(max_queries=4)
    return Frontend(
        Settings("helpsteer", "helpsteer2", 1.0, limits, None),
        prompts,
        WordsGenerator(),
        apm,
        Reward(ChatSplitter.from_tokenizer(tokenizer), weights),
    )


def test_get_reward_scores_each_response_given_its_conversation(steerable: SteerablePrompts, smollm2: Any):
    apm = RecordingAPM()
    frontend = _frontend(steerable, smollm2, apm)
    short, long = (openrlhf_query(smollm2, CONVERSATION, r) for r in ("Gravity.", RESPONSE))
    body = {"query": [short[0], long[0]], "prompts": [short[1], long[1]], "labels": [None, None]}
    answer = asyncio.run(frontend.get_reward(json.dumps(body).encode()))
    # The APM saw the HelpSteer2 form of the conversation and the bare response.
    expected_prompt = join_prompt_turns(
        [
            Turn("User", "What is a tide?"),
            Turn("Assistant", "The rise and fall of the sea."),
            Turn("User", "Why twice a day?"),
        ]
    )
    assert apm.seen == [(expected_prompt, ["Gravity."]), (expected_prompt, [RESPONSE])]
    # LengthAPM: helpfulness, correctness, coherence 4, complexity 2, verbosity = words.
    base = 0.65 * 4 + 0.8 * 4 + 0.45 * 4 + 0.55 * 2
    words = len(RESPONSE.split())
    assert answer["rewards"] == [pytest.approx(base - 0.4 * 1), pytest.approx(base - 0.4 * words)]
    assert answer["attributes"][1]["verbosity"] == words and set(answer["attributes"][0]) == set(apm.trained)


def test_get_reward_bad_requests_name_the_field(steerable: SteerablePrompts, smollm2: Any):
    frontend = _frontend(steerable, smollm2, LengthAPM())
    query, prompt = openrlhf_query(smollm2, CONVERSATION, "Gravity.")

    def error(body: dict[str, Any]) -> APIError:
        return error_of(frontend, body)

    assert error({"query": []}).param == "query"
    assert "cap of 4" in error({"query": [query] * 5}).message
    assert error({"query": [query, query], "prompts": [prompt]}).param == "prompts"
    bad = error({"query": [query, "no template here"]})
    assert (bad.status, bad.param) == (400, "query[1]") and "no assistant header" in bad.message
    assert error({"queries": [query]}).status == 400  # OpenRLHF's key is `query`
    without_apm = Frontend(frontend.settings, steerable, WordsGenerator(), None)
    assert error_of(without_apm, {"query": [query]}).status == 404


def error_of(frontend: Frontend, body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as caught:
        asyncio.run(frontend.get_reward(json.dumps(body).encode()))
    return caught.value


def test_the_nine_attribute_order_is_nemo_aligners():
    nemo = "quality toxicity humor creativity helpfulness correctness coherence complexity verbosity"
    assert STEERLM.names == tuple(nemo.split())
