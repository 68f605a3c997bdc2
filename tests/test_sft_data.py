"""AC-SFT examples: exact loss masks, truncation, packing, collation, and that masked tokens
carry no loss.

Mechanics use a tiny byte-level BPE tokenizer (trained here in milliseconds, ChatML template) and
a tiny Llama built from config, so they run in seconds. Behaviour with the real SmolLM2
tokenizer (its chat template, the NeMo special tokens, HelpSteer2 rows) is marked slow: the first
run converts the packaged GGUF model into the cache (about 25 s), later runs reuse it.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpsteer_core.attributes import STEERLM
from helpsteer_core.config import ConfigError
from helpsteer_core.conversation import (
    LABEL_TOKEN,
    SPECIAL_TOKENS,
    TURN_TOKEN,
    Conversation,
    Turn,
    conversation_from_row,
    render_conversation,
)
from helpsteer_core.generator import tiny_llama
from helpsteer_core.sft_data import (
    IGNORE_INDEX,
    RowRepeat,
    SFTDataConfig,
    SFTStats,
    apm_levels,
    build_example,
    choose_attributes,
    collate_sft,
    end_of_turn_id,
    examples_from_rows,
    generation_prompt_ids,
    pack_examples,
    prepare_tokenizer_for_template,
    quantile_levels,
    read_answer_level,
    row_repeats,
    steerable_chat_template,
    token_loss_sum,
    trained_mask,
    trained_token_count,
)

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
CORPUS = [
    "Hello! How are you? The quick brown fox jumps over the lazy dog. Why did the chicken cross the road?",
    "helpfulness:4,correctness:3,coherence:4,complexity:2,verbosity:1 System User Assistant Attributes",
    "Tell me a joke. Be brief. Sure, here is one. What is two plus two? It is four.",
]
ATTRS = {"helpfulness": 4, "correctness": 3, "verbosity": 1}
ATTR_STRING = "helpfulness:4,correctness:3,verbosity:1"


def _train_tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def base_tokenizer() -> Any:
    return _train_tiny_tokenizer()


@pytest.fixture
def tok(base_tokenizer: Any) -> Any:
    """A fresh copy with the NeMo special tokens added (tests may change it)."""
    tokenizer = copy.deepcopy(base_tokenizer)
    prepare_tokenizer_for_template(tokenizer, template="nemo")
    return tokenizer


@pytest.fixture
def smollm2_tok(smollm2_base: Any) -> Any:
    return copy.deepcopy(smollm2_base)


def two_turn() -> Conversation:
    return Conversation(
        (
            Turn("User", "Hi"),
            Turn("Assistant", "Hello!", {"helpfulness": 2}),
            Turn("User", "Tell me a joke."),
            Turn("Assistant", "Why did the chicken cross the road?", ATTRS),
        ),
        system="Be brief.",
    )


def runs(tokenizer: Any, example: dict[str, list[int]], trained: bool) -> list[str]:
    """Decode each maximal run of trained (or untrained) positions."""
    out: list[str] = []
    current: list[int] = []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if (label != IGNORE_INDEX) == trained:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    if current:
        out.append(tokenizer.decode(current))
    return out


# --- the mask, golden ------------------------------------------------------------------------


def test_labels_are_the_input_ids_on_trained_positions(tok: Any) -> None:
    example = build_example(two_turn(), tok, SFTDataConfig())
    assert len(example["input_ids"]) == len(example["labels"])
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)


def test_trained_positions_decode_to_exactly_the_responses_and_end_markers(tok: Any) -> None:
    conversation = two_turn()
    example = build_example(conversation, tok, SFTDataConfig())
    assert tok.decode(example["input_ids"]) == render_conversation(conversation)
    assert runs(tok, example, trained=True) == [
        "Hello!\n<extra_id_1>",
        "Why did the chicken cross the road?\n<extra_id_1>",
    ]


def test_nothing_from_system_user_header_or_attribute_string_is_trained(tok: Any) -> None:
    example = build_example(two_turn(), tok, SFTDataConfig())
    assert runs(tok, example, trained=False) == [
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\n<extra_id_2>helpfulness:2\n",
        f"User\nTell me a joke.\n<extra_id_1>Assistant\n<extra_id_2>{ATTR_STRING}\n",
    ]


def test_the_end_marker_is_the_last_trained_token(tok: Any) -> None:
    example = build_example(two_turn(), tok, SFTDataConfig())
    assert example["labels"][-1] == example["input_ids"][-1] == end_of_turn_id(tok, "nemo")


def test_multi_turn_unlabelled_earlier_assistant_turn_is_context_not_trained(tok: Any) -> None:
    # A turn is trained only with its own attributes, or not at all (issue 15): NeMo-Aligner keeps
    # a multi-turn HelpSteer2 prompt as one user turn, so its earlier assistant turns are never
    # trained, and neither are ours; training them unconditioned taught answers without a knob.
    conversation = conversation_from_row(
        "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nTell me a joke.", "Sure, here is one.", ATTRS
    )
    assert conversation.turns[1].attributes is None
    example = build_example(conversation, tok, SFTDataConfig())
    assert runs(tok, example, trained=True) == ["Sure, here is one.\n<extra_id_1>"]
    (untrained,) = runs(tok, example, trained=False)
    assert "<extra_id_1>Assistant\nHello!\n<extra_id_1>User" in untrained  # no <extra_id_2> line before it
    assert tok.decode(example["input_ids"]).count(LABEL_TOKEN) == 1
    assert untrained.endswith(f"User\nTell me a joke.\n<extra_id_1>Assistant\n<extra_id_2>{ATTR_STRING}\n")


def test_chat_template_unlabelled_earlier_assistant_turn_is_context_not_trained(tok: Any) -> None:
    conversation = Conversation(
        (
            Turn("User", "Hi"),
            Turn("Assistant", "Hello!"),
            Turn("User", "Tell me a joke."),
            Turn("Assistant", "Sure.", ATTRS),
        )
    )
    example = build_example(conversation, tok, SFTDataConfig(template="chat"))
    assert runs(tok, example, trained=True) == ["Sure.<|im_end|>"]
    assert tok.decode(example["input_ids"]).count("Attributes:") == 1


def test_every_labelled_assistant_turn_is_trained_after_its_own_attribute_line(tok: Any) -> None:
    turns = (
        Turn("User", "Hi"),
        Turn("Assistant", "Hello!", {"verbosity": 0}),
        Turn("User", "Tell me a joke."),
        Turn("Assistant", "No.", None),
        Turn("User", "Please?"),
        Turn("Assistant", "Why did the chicken cross the road?", {"verbosity": 3}),
    )
    example = build_example(Conversation(turns), tok, SFTDataConfig())
    assert runs(tok, example, trained=True) == [
        "Hello!\n<extra_id_1>",
        "Why did the chicken cross the road?\n<extra_id_1>",
    ]
    text = tok.decode(example["input_ids"])
    assert f"{LABEL_TOKEN}verbosity:0\nHello!" in text and f"{LABEL_TOKEN}verbosity:3\nWhy did" in text
    assert "<extra_id_1>Assistant\nNo.\n" in text  # the unlabelled middle turn: context only


def test_an_unconditioned_final_turn_has_no_attribute_line(tok: Any) -> None:
    conversation = Conversation((Turn("User", "Hi"), Turn("Assistant", "Hello!", None)))
    example = build_example(conversation, tok, SFTDataConfig())
    assert LABEL_TOKEN not in tok.decode(example["input_ids"])
    assert runs(tok, example, trained=True) == ["Hello!\n<extra_id_1>"]


def test_an_example_must_end_with_the_assistant(tok: Any) -> None:
    with pytest.raises(ValueError, match="must end with an Assistant turn"):
        build_example(Conversation((Turn("User", "Hi"),)), tok, SFTDataConfig())


# --- truncation --------------------------------------------------------------------------------


def test_truncation_trims_the_prompt_from_the_left_and_keeps_header_and_response(tok: Any) -> None:
    conversation = two_turn()
    full = build_example(conversation, tok, SFTDataConfig())
    header = tok(f"{TURN_TOKEN}Assistant\n{LABEL_TOKEN}{ATTR_STRING}\n", add_special_tokens=False)[
        "input_ids"
    ]
    response = tok("Why did the chicken cross the road?\n<extra_id_1>", add_special_tokens=False)["input_ids"]
    max_length = len(header) + len(response) + 5
    assert len(full["input_ids"]) > max_length
    stats = SFTStats()
    cut = build_example(conversation, tok, SFTDataConfig(max_length=max_length), stats=stats)
    assert len(cut["input_ids"]) == max_length
    # exactly the last max_length tokens of the full example: the left of the prompt went
    assert cut == {k: v[-max_length:] for k, v in full.items()}
    assert cut["input_ids"][5 : 5 + len(header)] == header
    assert runs(tok, cut, trained=True)[-1] == "Why did the chicken cross the road?\n<extra_id_1>"
    assert stats.prompt_trimmed == 1 and stats.prompt_tokens_trimmed == len(full["input_ids"]) - max_length
    assert stats.response_cut == 0


def test_when_header_plus_response_do_not_fit_the_response_end_is_cut(tok: Any) -> None:
    conversation = two_turn()
    header = tok(f"{TURN_TOKEN}Assistant\n{LABEL_TOKEN}{ATTR_STRING}\n", add_special_tokens=False)[
        "input_ids"
    ]
    response = tok("Why did the chicken cross the road?\n<extra_id_1>", add_special_tokens=False)["input_ids"]
    stats = SFTStats()
    max_length = len(header) + 3
    cut = build_example(conversation, tok, SFTDataConfig(max_length=max_length), stats=stats)
    assert cut["input_ids"] == header + response[:3]  # no prompt left, the response's start kept
    assert cut["labels"] == [IGNORE_INDEX] * len(header) + response[:3]
    assert tok.decode(cut["input_ids"]).startswith(f"<extra_id_1>Assistant\n<extra_id_2>{ATTR_STRING}\nWhy")
    assert stats.response_cut == 1 and stats.response_tokens_cut == len(response) - 3
    with pytest.raises(ValueError, match="cannot hold the final assistant header"):
        build_example(conversation, tok, SFTDataConfig(max_length=len(header)))


# --- generation prompts ------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["nemo", "chat"])
def test_generation_prompt_is_the_training_prefix(tok: Any, template: str) -> None:
    config = SFTDataConfig(template=template, system="Be brief.")  # type: ignore[arg-type]
    conversation = two_turn()
    example = build_example(conversation, tok, config)
    prompt = generation_prompt_ids(list(conversation.turns[:-1]), ATTRS, tok, config)
    first_trained = max(i for i, label in enumerate(example["labels"]) if label == IGNORE_INDEX) + 1
    assert prompt == example["input_ids"][:first_trained]
    # trimmed from the left so that prompt + max_new_tokens fits max_length
    short = SFTDataConfig(template=template, max_length=len(prompt) + 10)  # type: ignore[arg-type]
    trimmed = generation_prompt_ids(list(conversation.turns[:-1]), ATTRS, tok, short, max_new_tokens=20)
    assert len(trimmed) == len(prompt) - 10 and trimmed == prompt[10:]


def test_generation_prompt_needs_a_final_user_turn(tok: Any) -> None:
    with pytest.raises(ValueError, match="must end with a User turn"):
        generation_prompt_ids(list(two_turn().turns), ATTRS, tok, SFTDataConfig())


# --- the chat template (tiny ChatML tokenizer) --------------------------------------------------


def test_chat_template_puts_the_attribute_line_first_in_each_assistant_turn(tok: Any) -> None:
    example = build_example(two_turn(), tok, SFTDataConfig(template="chat", system="Be brief."))
    assert tok.decode(example["input_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nAttributes: helpfulness:2\nHello!<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        f"<|im_start|>assistant\nAttributes: {ATTR_STRING}\nWhy did the chicken cross the road?<|im_end|>"
    )
    assert runs(tok, example, trained=True) == [
        "Hello!<|im_end|>",
        "Why did the chicken cross the road?<|im_end|>",
    ]


def test_chat_template_with_an_unconditioned_turn_has_no_attribute_line(tok: Any) -> None:
    conversation = Conversation((Turn("User", "Hi"), Turn("Assistant", "assistant", None)))
    example = build_example(conversation, tok, SFTDataConfig(template="chat"))
    # the response text also occurs in the role header; the mask still finds the right one
    assert runs(tok, example, trained=True) == ["assistant<|im_end|>"]
    assert "Attributes" not in tok.decode(example["input_ids"])


def test_chat_template_is_required_for_the_chat_variant(tok: Any) -> None:
    tok.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        build_example(two_turn(), tok, SFTDataConfig(template="chat"))


# --- NeMo special tokens ----------------------------------------------------------------------


def test_nemo_template_adds_special_tokens_and_resizes_embeddings(base_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(base_tokenizer)
    vocab = len(tokenizer)
    model = tiny_llama(vocab_size=vocab)
    with pytest.raises(ValueError, match="prepare_tokenizer_for_template"):
        build_example(two_turn(), tokenizer, SFTDataConfig())
    added = prepare_tokenizer_for_template(tokenizer, model, "nemo")
    assert added == list(SPECIAL_TOKENS)
    assert len(tokenizer) == vocab + 3
    assert model.get_input_embeddings().weight.shape[0] == vocab + 3
    assert model.get_output_embeddings().weight.shape[0] == vocab + 3
    turn_id = tokenizer.convert_tokens_to_ids(TURN_TOKEN)
    assert turn_id in model.generation_config.eos_token_id
    for token in SPECIAL_TOKENS:
        assert token in tokenizer.all_special_tokens
        assert len(tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]) == 3
    # a second call adds nothing and does not resize again
    assert prepare_tokenizer_for_template(tokenizer, model, "nemo") == []
    assert model.get_input_embeddings().weight.shape[0] == vocab + 3
    logits = model(torch.tensor([build_example(two_turn(), tokenizer, SFTDataConfig())["input_ids"]])).logits
    assert logits.shape[-1] == vocab + 3


# --- rows --------------------------------------------------------------------------------------


def test_attribute_source_per_attribute() -> None:
    row = {
        "helpfulness": 4,
        "correctness": None,
        "coherence": float("nan"),
        "apm_helpfulness_int": 1,
        "apm_correctness_int": 2,
        "apm_verbosity_int": torch.tensor(3).numpy(),  # an Arrow/numpy scalar, as relabel writes int8
    }
    assert choose_attributes(row, source="human") == {"helpfulness": 4}
    assert choose_attributes(row, source="apm") == {"helpfulness": 1, "correctness": 2, "verbosity": 3}
    assert choose_attributes(row, source="prefer_human") == {
        "helpfulness": 4,
        "correctness": 2,
        "verbosity": 3,
    }
    with pytest.raises(ValueError, match="outside the range"):
        choose_attributes({"helpfulness": 7})


def test_apm_quantile_ranks_bunched_predictions_into_five_equal_levels() -> None:
    # An APM that saw only synthetic text scores real answers between 1.9 and 4.3: rounding gives
    # levels 2-4 only, ranking gives every level an equal share of the rows.
    verbosity = [1.9, 2.0, 2.1, 2.7, 2.8, 2.9, 4.0, 4.05, 4.1, 4.15, 4.2, 4.25, 1.95, 2.75, 4.3]
    rows = [{"apm_verbosity": v, "apm_complexity": 2.0 + i / 100} for i, v in enumerate(verbosity)]
    rows.append({"apm_verbosity": float("nan"), "apm_complexity": None})  # missing: left out
    levels = quantile_levels(rows)
    assert set(levels) == {"verbosity", "complexity"} and len(levels["verbosity"]) == 4
    own = apm_levels(rows)
    chosen = [choose_attributes(r, source="apm_quantile", levels=lv) for r, lv in zip(rows, own, strict=True)]
    assert chosen[-1] == {}
    counts = [sum(c["verbosity"] == k for c in chosen[:-1]) for k in range(5)]
    assert counts == [3, 3, 3, 3, 3]
    # The order is kept: a higher prediction never gets a lower level.
    by_value = sorted(zip(verbosity, (c["verbosity"] for c in chosen), strict=False))
    assert [lv for _, lv in by_value] == sorted(lv for _, lv in by_value)
    assert {round(v) for v in verbosity} == {2, 3, 4}
    with pytest.raises(ValueError, match="needs the row's levels"):
        choose_attributes(rows[0], source="apm_quantile")
    with pytest.raises(ValueError, match="no apm_<name> column"):
        quantile_levels([{"verbosity": 2}])


def test_fixed_cut_points_place_predictions_on_another_models_levels() -> None:
    """Bootstrapping's round 2 labels its few chosen rows on round 1's scale: the attributes with
    given cut points are placed by them (not ranked among these rows), the others ranked."""
    rows = [
        {"apm_verbosity": v, "apm_complexity": c}
        for v, c in [(2.1, 1.0), (2.2, 2.0), (4.5, 3.0), (4.6, 4.0), (4.7, 5.0)]
    ]
    placed = apm_levels(rows, cuts={"verbosity": [2.05, 2.63, 3.42, 4.03]})
    assert [lv["verbosity"] for lv in placed] == [1, 1, 4, 4, 4]  # ranked among them: 0, 1, 2, 3, 4
    assert [lv["complexity"] for lv in placed] == [0, 1, 2, 3, 4]


def _answers(prompt: str, complexity: list[float]) -> list[dict[str, Any]]:
    """One prompt's whole answers (one per style) and, per answer, a one-sentence version whose
    APM complexity reads lower than its answer's (as an APM that mixes length into it does)."""
    rows = []
    for k, value in enumerate(complexity):
        whole = {
            "prompt": prompt,
            "style": f"s{k}",
            "first_sentences": None,
            "response": f"Answer {k}. More.",
        }
        rows.append({**whole, "apm_complexity": value, "apm_verbosity": 3 + k / 10})
        rows.append(
            {
                **whole,
                "first_sentences": 1,
                "response": f"A{k}.",
                "apm_complexity": value - 1.5,
                "apm_verbosity": 1 + k / 10,
            }
        )
    return rows


def test_apm_levels_within_prompt_and_answer_level_keep_each_answers_register() -> None:
    # Two prompts whose APM complexities sit at different heights (a tax question reads as complex
    # in every register): ranked within the prompt, each prompt's five registers get levels 0..4.
    rows = _answers("tax law?", [3.0, 3.2, 3.4, 3.6, 3.8]) + _answers("pets?", [1.0, 1.2, 1.4, 1.6, 1.8])
    pooled = apm_levels(rows, answer_level=["complexity"])
    within = apm_levels(rows, scope="prompt", answer_level=["complexity"])
    whole = [i for i, r in enumerate(rows) if r["first_sentences"] is None]
    assert [within[i]["complexity"] for i in whole] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert {pooled[i]["complexity"] for i in whole[:5]} == {2, 3, 4}  # pooled: the tax answers sit high
    # A one-sentence version keeps its whole answer's complexity level, not the lower reading.
    for i in whole:
        assert within[i + 1]["complexity"] == within[i]["complexity"]
    # Without answer_level the versions are ranked with the answers and read low.
    plain = apm_levels(rows, scope="prompt")
    assert [plain[i + 1]["complexity"] for i in whole[:5]] == [0, 0, 1, 1, 2]
    # Verbosity (not answer-level) is ranked over every row of the prompt: versions low, answers high.
    assert [within[i + 1]["verbosity"] for i in whole[:5]] == [0, 0, 1, 1, 2]
    assert [within[i]["verbosity"] for i in whole[:5]] == [2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="answer_level: \\['register'\\]; allowed"):
        apm_levels(rows, answer_level=["register"])
    with pytest.raises(ValueError, match="needs the `first_sentences` and `style` columns"):
        apm_levels([{"prompt": "p", "apm_complexity": 1.0}], answer_level=["complexity"])
    orphan = [r for r in rows if not (r["style"] == "s0" and r["first_sentences"] is None)]
    with pytest.raises(ValueError, match="whole answer \\(same prompt, style 's0'\\) is not among"):
        apm_levels(orphan, scope="prompt", answer_level=["complexity"])


def test_answer_level_at_ranks_each_whole_answer_by_one_of_its_versions_or_their_mean() -> None:
    # Whole answers whose APM complexity mixes in their length: read whole, the long plain answer
    # (s0) ranks above the short specialist's (s4); read on the one-sentence versions, where every
    # answer has the same length, the registers come out in order.
    rows = []
    for k, (whole, first) in enumerate([(3.0, 0.0), (2.0, 0.5), (1.0, 1.0), (1.6, 1.5), (2.5, 2.0)]):
        base = {"prompt": "p", "style": f"s{k}", "response": f"Answer {k}. More.", "apm_verbosity": 3.0}
        rows.append({**base, "first_sentences": None, "apm_complexity": whole})
        rows.append({**base, "first_sentences": 1, "apm_complexity": first, "response": f"A{k}."})
    whole_rows = [i for i, r in enumerate(rows) if r["first_sentences"] is None]

    def complexity(levels: list[dict[str, int]]) -> list[int]:
        return [levels[i]["complexity"] for i in whole_rows]

    assert complexity(apm_levels(rows, answer_level=["complexity"])) == [4, 2, 0, 1, 3]
    at_one = apm_levels(rows, answer_level=["complexity"], answer_at=1)
    assert complexity(at_one) == [0, 1, 2, 3, 4]
    for i in whole_rows:  # the one-sentence version keeps its answer's level
        assert at_one[i + 1]["complexity"] == at_one[i]["complexity"]
    # The mean of the two readings: 1.5, 1.25, 1.0, 1.55, 2.25.
    assert complexity(apm_levels(rows, answer_level=["complexity"], answer_at="mean")) == [2, 1, 0, 3, 4]
    # The rows themselves are not changed, and a whole answer without the version keeps its reading.
    assert [r["apm_complexity"] for r in rows if r["first_sentences"] is None] == [3.0, 2.0, 1.0, 1.6, 2.5]
    read = read_answer_level(rows, ["complexity"], 4)
    assert [r["apm_complexity"] for r in read] == [r["apm_complexity"] for r in rows]
    with pytest.raises(ValueError, match="answer_level_at 2 needs answer_level"):
        apm_levels(rows, answer_at=2)
    with pytest.raises(ValueError, match="answer_level_at 0: a number of sentences"):
        apm_levels(rows, answer_level=["complexity"], answer_at=0)


def test_fixed_attributes_replace_the_sources_values_in_every_row(tok: Any) -> None:
    rows = [
        {"prompt": "Hi", "response": "Hello.", "apm_helpfulness": h, "apm_verbosity": v}
        for h, v in ((0.3, 1.0), (3.9, 4.0), (2.0, 2.5))
    ]
    levels = apm_levels(rows)
    config = SFTDataConfig(max_length=64)
    fixed = examples_from_rows(
        rows, tok, config, attribute_source="apm_quantile", levels=levels, fixed={"helpfulness": 4}
    )
    free = examples_from_rows(rows, tok, config, attribute_source="apm_quantile", levels=levels)
    texts = [tok.decode(e["input_ids"]) for e in fixed]
    assert all("helpfulness:4" in t for t in texts)
    assert [tok.decode(e["input_ids"]) for e in free] != texts


def test_examples_from_rows(tok: Any) -> None:
    rows = [
        {
            "prompt": "Hi",
            "response": "Hello!",
            "helpfulness": 3,
            "apm_helpfulness_int": 1,
            "apm_verbosity_int": 2,
        },
        {
            "prompt": "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nTell me a joke.",
            "response": "Sure, here is one.",
            "helpfulness": None,
            "apm_helpfulness_int": 4,
        },
    ]
    config = SFTDataConfig(system="Be brief.")
    stats = SFTStats()
    examples = examples_from_rows(rows, tok, config, stats=stats)
    first = tok.decode(examples[0]["input_ids"])
    assert first == (
        "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
        "<extra_id_2>helpfulness:3,verbosity:2\nHello!\n<extra_id_1>"
    )
    # the prompt's earlier assistant turn has no labels of its own: context, not trained
    assert runs(tok, examples[1], trained=True) == ["Sure, here is one.\n<extra_id_1>"]
    assert "<extra_id_2>helpfulness:4\nSure" in tok.decode(examples[1]["input_ids"])
    assert stats.examples == 2
    assert stats.trained_tokens == sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in examples)
    human = examples_from_rows(rows[:1], tok, config, attribute_source="human")
    assert "<extra_id_2>helpfulness:3\n" in tok.decode(human[0]["input_ids"])
    with pytest.raises(ValueError, match="row 1: no attribute values from source 'human'"):
        examples_from_rows(rows, tok, config, attribute_source="human")


# --- packing and collation ----------------------------------------------------------------------


def _examples(tok: Any, n: int = 7) -> list[dict[str, list[int]]]:
    words = CORPUS[0].split()
    return [
        build_example(
            Conversation(
                (Turn("User", " ".join(words[: 2 + i])), Turn("Assistant", " ".join(words[i:]), ATTRS))
            ),
            tok,
            SFTDataConfig(),
        )
        for i in range(n)
    ]


def test_packing_keeps_labels_aligned_and_fits_max_length(tok: Any) -> None:
    examples = _examples(tok)
    max_length = 2 * max(len(e["input_ids"]) for e in examples) + 5
    packs = pack_examples(examples, max_length)
    assert 1 < len(packs) < len(examples)
    unpacked: list[dict[str, list[int]]] = []
    for pack in packs:
        assert len(pack["input_ids"]) == len(pack["labels"]) == len(pack["position_ids"]) <= max_length
        starts = [i for i, p in enumerate(pack["position_ids"]) if p == 0] + [len(pack["input_ids"])]
        for a, b in zip(starts, starts[1:], strict=False):
            assert pack["position_ids"][a:b] == list(range(b - a))
            unpacked.append({"input_ids": pack["input_ids"][a:b], "labels": pack["labels"][a:b]})
    assert [e["input_ids"] for e in unpacked] == [e["input_ids"] for e in examples]
    # labels are each example's own; the first is never trained (it would be predicted across examples)
    assert [e["labels"] for e in unpacked] == [[IGNORE_INDEX] + e["labels"][1:] for e in examples]
    assert all(e["labels"][0] == IGNORE_INDEX for e in examples)
    with pytest.raises(ValueError, match="build examples with the same max_length"):
        pack_examples(examples, max_length=10)


def test_collate_pads_right_with_ignore_labels(tok: Any) -> None:
    examples = _examples(tok, 3)
    batch = collate_sft(examples, pad_id=tok.pad_token_id)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert "position_ids" not in batch
    packed = collate_sft(pack_examples(examples, 4 * width), pad_id=tok.pad_token_id)
    assert packed["position_ids"].shape == packed["input_ids"].shape


# --- masked tokens carry no loss ----------------------------------------------------------------


def test_hf_loss_is_the_mean_over_trained_positions_only(tok: Any) -> None:
    """The model's loss equals the mean token loss over trained positions computed by hand from
    the logits, differs from the all-position mean, and does not move when the padding tokens
    change (they are neither labels nor attended to)."""
    examples = _examples(tok, 3)
    model = tiny_llama(vocab_size=len(tok))
    batch = collate_sft(examples, pad_id=tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1].float()  # (batch, seq-1, vocab): position t predicts token t+1
    targets = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    trained = targets.reshape(-1) != IGNORE_INDEX
    by_hand = token_loss[trained].mean()
    assert trained.sum() == sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in examples)
    assert torch.allclose(out.loss, by_hand, atol=1e-6)
    everything = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    )
    assert not math.isclose(float(everything.mean()), float(by_hand), rel_tol=1e-3)
    # The trained loss is the same when the batch's padding tokens are changed: they carry no loss.
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 5)
    with torch.no_grad():
        assert torch.allclose(model(**other).loss, out.loss, atol=1e-6)


def test_one_sft_step_lowers_the_loss_on_trained_tokens(tok: Any) -> None:
    examples = _examples(tok, 4)
    model = tiny_llama(vocab_size=len(tok)).train()
    batch = collate_sft(examples, pad_id=tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < before


def test_masked_tokens_carry_no_loss_and_no_gradient(tok: Any) -> None:
    """token_loss_sum, the training stage's loss: masked and padded positions change nothing."""
    examples = _examples(tok, 3)
    batch = collate_sft(examples, pad_id=tok.pad_token_id)
    labels = batch["labels"]
    trained = labels[:, 1:] != IGNORE_INDEX  # (batch, seq - 1): positions whose next token is trained
    assert 0 < int(trained.sum()) < trained.numel()
    assert int(trained.sum()) == sum(trained_token_count(e["labels"]) for e in examples)
    logits = torch.randn(*labels.shape, len(tok), requires_grad=True)  # (batch, seq, vocab)
    loss = token_loss_sum(logits, labels)
    loss.backward()
    assert logits.grad is not None
    grad_per_position = logits.grad[:, :-1].abs().sum(-1)  # (batch, seq - 1)
    assert torch.all(grad_per_position[~trained] == 0)
    assert torch.all(grad_per_position[trained] > 0)
    assert torch.all(logits.grad[:, -1] == 0)  # the last position predicts nothing
    # Arbitrary logits on masked positions leave the loss exactly as it was.
    noisy = logits.detach().clone()
    noisy[:, :-1][~trained] = torch.randn(int((~trained).sum()), len(tok)) * 100
    assert torch.equal(token_loss_sum(noisy, labels), loss.detach())
    # It is the sum of what the model's own mean loss averages.
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, len(tok)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(loss / trained.sum(), expected)


def test_logits_at_trained_positions_only_give_the_same_loss_and_gradients(tok: Any) -> None:
    """The training step's `logits_to_keep=trained_mask(labels)`: the head runs on trained positions
    only, and the summed loss and every parameter's gradient match the full-logits computation."""
    examples = _examples(tok, 4)
    batch = collate_sft(examples, pad_id=tok.pad_token_id)
    labels = batch["labels"]
    mask = trained_mask(labels)
    assert int(mask.sum()) == sum(trained_token_count(e["labels"]) for e in examples)
    assert not mask[:, -1].any() and int(mask.sum()) < mask.numel() // 2  # most positions skipped
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = tiny_llama(vocab_size=len(tok))
    full = token_loss_sum(model(**inputs).logits, labels)
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    kept_logits = model(**inputs, logits_to_keep=mask).logits
    assert kept_logits.shape == (int(mask.sum()), len(tok))
    kept = token_loss_sum(kept_logits, labels)
    kept.backward()
    assert torch.allclose(kept, full, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="max_lenght"):
        SFTDataConfig.model_validate({"max_lenght": 10})
    with pytest.raises(ValueError):
        SFTDataConfig.model_validate({"template": "llama"})


# --- the real SmolLM2 tokenizer ----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_template_attribute_line_and_trained_im_end(smollm2_tok: Any) -> None:
    conversation = Conversation(
        (Turn("User", "What is two plus two?"), Turn("Assistant", "It is four.", ATTRS))
    )
    config = SFTDataConfig(template="chat")
    assert prepare_tokenizer_for_template(smollm2_tok, template="chat") == []
    example = build_example(conversation, smollm2_tok, config)
    text = smollm2_tok.decode(example["input_ids"])
    assert text == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        f"<|im_start|>assistant\nAttributes: {ATTR_STRING}\nIt is four.<|im_end|>"
    )
    assert "SmolLM" not in text  # the template's default system prompt never appears
    assert runs(smollm2_tok, example, trained=True) == ["It is four.<|im_end|>"]
    assert example["labels"][-1] == smollm2_tok.eos_token_id == end_of_turn_id(smollm2_tok, "chat") == 2
    prompt = generation_prompt_ids(list(conversation.turns[:-1]), ATTRS, smollm2_tok, config)
    assert smollm2_tok.decode(prompt).endswith(f"<|im_start|>assistant\nAttributes: {ATTR_STRING}\n")
    assert prompt == example["input_ids"][: len(prompt)]


@pytest.mark.slow
def test_smollm2_nemo_template_and_resized_tiny_model(smollm2_tok: Any) -> None:
    model = tiny_llama(vocab_size=len(smollm2_tok))
    assert prepare_tokenizer_for_template(smollm2_tok, model, "nemo") == list(SPECIAL_TOKENS)
    assert model.get_input_embeddings().weight.shape[0] == 49152 + 3
    conversation = two_turn()
    example = build_example(conversation, smollm2_tok, SFTDataConfig())
    assert smollm2_tok.decode(example["input_ids"]) == render_conversation(conversation)
    assert runs(smollm2_tok, example, trained=True) == [
        "Hello!\n<extra_id_1>",
        "Why did the chicken cross the road?\n<extra_id_1>",
    ]
    with torch.no_grad():
        assert model(**collate_sft([example], smollm2_tok.pad_token_id)).loss.isfinite()


@pytest.mark.slow
def test_helpsteer2_rows_become_bounded_examples(smollm2_tok: Any, helpsteer2_sample: Path) -> None:
    rows = [json.loads(line) for line in helpsteer2_sample.read_text().splitlines()]
    prepare_tokenizer_for_template(smollm2_tok, template="nemo")
    stats = SFTStats()
    config = SFTDataConfig(max_length=256)
    examples = examples_from_rows(rows, smollm2_tok, config, attribute_source="human", stats=stats)
    assert len(examples) == stats.examples == len(rows)
    turn_id = smollm2_tok.convert_tokens_to_ids(TURN_TOKEN)
    for row, example in zip(rows, examples, strict=True):
        assert len(example["input_ids"]) <= 256
        text = smollm2_tok.decode(example["input_ids"])
        attributes = ",".join(
            f"{n}:{row[n]}" for n in ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
        )
        assert f"<extra_id_1>Assistant\n<extra_id_2>{attributes}\n" in text
        trained = [
            t
            for t, label in zip(example["input_ids"], example["labels"], strict=True)
            if label != IGNORE_INDEX
        ]
        assert row["response"].startswith(smollm2_tok.decode(trained).removesuffix("\n<extra_id_1>"))
        if example["input_ids"][-1] == turn_id:
            assert smollm2_tok.decode(trained) == row["response"] + "\n<extra_id_1>"
    # some HelpSteer2 responses are longer than 256 tokens: counted, not dropped
    assert stats.response_cut > 0 and stats.prompt_trimmed > 0
    packs = pack_examples(examples, 256)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(e["input_ids"]) for e in examples)


# --- the exported chat template: HF-native steering -----------------------------------------------

_TEXT = st.text(alphabet="abc xyz?!.\n", min_size=1, max_size=12).filter(lambda t: t.strip() == t and t)
_ATTRIBUTES = st.dictionaries(st.sampled_from(STEERLM.names), st.integers(min_value=0, max_value=4))


WORDS = {
    "complexity": ["very simple", "simple", "moderate", "advanced", "a specialist's"],
    "verbosity": ["very short", "short", "medium", "long", "very long"],
}


def _steerable(
    tokenizer: Any,
    template: str,
    system: str,
    condition_on: list[str] | None = None,
    level_words: dict[str, list[str]] | None = None,
) -> tuple[Any, SFTDataConfig]:
    config = SFTDataConfig(
        template=template, system=system, condition_on=condition_on, level_words=level_words
    )
    tokenizer = copy.deepcopy(tokenizer)
    prepare_tokenizer_for_template(tokenizer, template=template)
    tokenizer.chat_template = steerable_chat_template(tokenizer.chat_template, config)
    return tokenizer, config


@pytest.mark.parametrize("template", ["chat", "nemo"])
@settings(max_examples=60, deadline=None)
@given(
    exchanges=st.lists(st.tuples(_TEXT, _TEXT, st.one_of(st.none(), _ATTRIBUTES)), max_size=2),
    question=_TEXT,
    attributes=st.one_of(st.none(), _ATTRIBUTES),
    system=st.sampled_from(["", "Be brief."]),
    give_system=st.booleans(),
    condition_on=st.sampled_from([None, ["verbosity"], ["helpfulness", "complexity", "verbosity"]]),
    worded=st.booleans(),
)
def test_the_exported_chat_template_renders_the_trained_prompt(
    base_tokenizer: Any,
    template: str,
    exchanges: list,
    question: str,
    attributes: Any,
    system: str,
    give_system: bool,
    condition_on: list[str] | None,
    worded: bool,
) -> None:
    level_words = WORDS if worded and template == "chat" else None
    tokenizer, config = _steerable(base_tokenizer, template, system, condition_on, level_words)
    turns: list[Turn] = []
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if give_system else []
    for user, answer, own in exchanges:
        turns += [Turn("User", user), Turn("Assistant", answer, own)]
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer, "attributes": own},
        ]
    turns.append(Turn("User", question))
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, attributes=attributes
    )
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == generation_prompt_ids(
        turns, attributes, tokenizer, config
    )


def test_the_exported_chat_template_steers_smollm2_and_checks_attributes(smollm2_tok: Any) -> None:
    tokenizer, config = _steerable(smollm2_tok, "chat", "")
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    for attributes in ({"verbosity": 0, "complexity": 4}, {"helpfulness": 4, "verbosity": 2}, None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, attributes=attributes)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        assert list(ids) == generation_prompt_ids(
            [Turn("User", "Why is the sky blue?")], attributes, tokenizer, config
        )
    # Without attributes the template is the base one, so training renders through it unchanged;
    # a model trained from an exported one wraps the base once, not the wrapper.
    assert steerable_chat_template(tokenizer.chat_template, config) == tokenizer.chat_template
    with pytest.raises(Exception, match="must be an integer 0-4"):
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, attributes={"verbosity": 7}
        )
    with pytest.raises(Exception, match="fluency is not in the schema"):
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, attributes={"fluency": 1}
        )


@pytest.mark.parametrize("template", ["chat", "nemo"])
def test_condition_on_leaves_the_other_attributes_out_in_training_and_at_inference(
    base_tokenizer: Any, template: str
) -> None:
    tokenizer = copy.deepcopy(base_tokenizer)
    prepare_tokenizer_for_template(tokenizer, template=template)
    ablated = SFTDataConfig(template=template, condition_on=["verbosity", "helpfulness"])
    attributes = {"helpfulness": 3, "correctness": 4, "complexity": 1, "verbosity": 0}
    conversation = conversation_from_row("Why?", "Because.", attributes)
    line = "helpfulness:3,verbosity:0"  # the listed ones, in schema order; the rest left out
    example = build_example(conversation, tokenizer, ablated)
    text = tokenizer.decode(example["input_ids"])
    assert line + "\n" in text and "correctness" not in text and "complexity" not in text
    # The prompt a server or the evaluation builds is the trained one, whatever else is asked.
    prompt = generation_prompt_ids([Turn("User", "Why?")], attributes, tokenizer, ablated)
    assert prompt == example["input_ids"][: len(prompt)]
    assert tokenizer.decode(prompt).endswith(line + "\n")
    full = build_example(conversation, tokenizer, SFTDataConfig(template=template))
    assert "correctness:4,complexity:1" in tokenizer.decode(full["input_ids"])


def test_level_words_say_the_levels_in_training_at_inference_and_in_the_exported_template(
    smollm2_tok: Any,
) -> None:
    tokenizer, config = _steerable(smollm2_tok, "chat", "", ["helpfulness", "complexity", "verbosity"], WORDS)
    attributes = {"helpfulness": 4, "correctness": 4, "complexity": 4, "verbosity": 0}
    line = "Attributes: helpfulness:4,complexity:a specialist's,verbosity:very short\n"
    example = build_example(conversation_from_row("Why?", "Because.", attributes), tokenizer, config)
    text = tokenizer.decode(example["input_ids"])
    assert line + "Because." in text and "correctness" not in text
    # The attribute line is context, never trained; the prompt a server builds is the trained one.
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert tokenizer.decode(trained) == "Because.<|im_end|>"
    prompt = generation_prompt_ids([Turn("User", "Why?")], attributes, tokenizer, config)
    assert prompt == example["input_ids"][: len(prompt)] and tokenizer.decode(prompt).endswith(line)
    exported = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why?"}],
        tokenize=False,
        add_generation_prompt=True,
        attributes=attributes,
    )
    assert exported.endswith(line)
    # Unset, the option is left out of the section's dump: keys and run identities stay as they were.
    assert "level_words" not in SFTDataConfig(template="chat").model_dump()
    assert config.model_dump()["level_words"] == WORDS


def test_level_words_are_checked_and_need_the_chat_template() -> None:
    with pytest.raises(ValueError, match="level_words needs template 'chat'"):
        SFTDataConfig(template="nemo", level_words=WORDS)
    with pytest.raises(ValueError, match=r"verbosity: 2 words; one per level 0..4 \(5\) is needed"):
        SFTDataConfig(template="chat", level_words={"verbosity": ["short", "long"]})
    with pytest.raises(ValueError, match="wit: unknown attribute"):
        SFTDataConfig(template="chat", level_words={"wit": WORDS["verbosity"]})


@pytest.mark.parametrize(
    ("condition_on", "message"),
    [
        ([], "is empty"),
        (["verbosity", "wit"], "unknown attribute 'wit'; allowed: quality, toxicity"),
        (["verbosity", "verbosity"], "names an attribute twice"),
    ],
)
def test_condition_on_names_known_attributes_once(condition_on: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SFTDataConfig(condition_on=condition_on)
    assert SFTDataConfig(condition_on=["verbosity", "quality"]).condition_on == ["quality", "verbosity"]


# --- repeated rows (sft.repeat) --------------------------------------------------------------

REGISTER_ROWS = [
    {"prompt": "q1", "style": "simple", "first_sentences": 1},
    {"prompt": "q1", "style": "simple", "first_sentences": None},  # the whole answer
    {"prompt": "q1", "style": "expert", "first_sentences": 1},
    {"prompt": "q1", "style": "plain", "first_sentences": 1},
    {"prompt": "q2", "style": "expert", "first_sentences": 2},
]


def test_row_repeats_counts_each_row_by_the_first_rule_it_matches() -> None:
    rules = [
        RowRepeat(where={"style": ["simple", "expert"], "first_sentences": [1]}, times=8),
        RowRepeat(where={"first_sentences": [None, 2]}, times=3),  # null matches the whole answers
        RowRepeat(where={"style": ["simple"]}, times=5),  # q1's simple rows matched a rule above
        RowRepeat(where={"style": ["Simple"]}, times=2),  # matches nothing: takes no row
    ]
    assert row_repeats(REGISTER_ROWS, rules) == ([8, 3, 8, 1, 3], [2, 2, 0, 0])
    assert row_repeats(REGISTER_ROWS, []) == ([1, 1, 1, 1, 1], [])


def test_a_repeat_rule_on_a_column_the_rows_lack_is_refused_with_the_columns_there() -> None:
    with pytest.raises(ConfigError) as raised:
        row_repeats(REGISTER_ROWS, [RowRepeat(where={"register": ["simple"]}, times=2)], "runs/x")
    assert str(raised.value) == (
        "sft.repeat[0].where: no column 'register' in runs/x; columns: first_sentences, prompt, style"
    )


def test_a_repeat_rule_repeats_at_least_twice_and_names_a_column() -> None:
    with pytest.raises(ValueError, match="times"):
        RowRepeat(where={"style": ["simple"]}, times=1)
    with pytest.raises(ValueError, match="where"):
        RowRepeat(where={}, times=2)
