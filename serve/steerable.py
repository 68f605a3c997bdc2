"""A trained generator folder as Serve uses it: the prompt it was trained on, its context, its stops.

An AC-SFT output folder (`ray_jobs.train_sft`) is a Hugging Face folder plus
`attribute_schema.json` and `sft_config.yaml`, whose `examples:` section is the `SFTDataConfig`
that built the training prompts. Everything here derives from those files, so a served prompt is
byte for byte the prompt the model was trained to continue (`sft_data.generation_prompt_ids`).

- `read_training_setup(folder)`: the parsed `sft_config.yaml` (what `ray_jobs.evaluate` reads too).
- `SteerablePrompts`: tokenizer only, no weights (the HTTP ingress): builds prompt ids and refuses
  a prompt that does not fit the context instead of trimming it, as training would.
- `load_steerable(model, examples)`: model, tokenizer and end-of-turn stop ids, ready to generate
  (the replicas; the same setup as `ray_jobs.evaluate`'s generator actors).

No ray imports here: the ingress, the replicas, the benchmark and the tests share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpsteer_core.attributes import STEERLM, LevelScale, load_and_check_schema
from helpsteer_core.conversation import Turn
from helpsteer_core.generator import (
    SFT_CONFIG_FILE,
    load_generator_tokenizer,
    load_steerable,
    read_training_setup,
)
from helpsteer_core.sft_data import (
    SFTDataConfig,
    end_of_turn_id,
    generation_prompt_ids,
    prepare_tokenizer_for_template,
)

__all__ = ["SFT_CONFIG_FILE", "PromptTooLong", "SteerablePrompts", "load_steerable", "read_training_setup"]
SCHEMA = STEERLM
_UNLIMITED = 1 << 30  # a max_length no prompt reaches: nothing is trimmed, so the true length shows


class PromptTooLong(ValueError):
    """A prompt that, with the tokens asked for, does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        super().__init__(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_new_tokens}: together "
            f"{prompt_tokens + max_new_tokens}, over the model's context of {context} tokens; "
            "shorten the messages or lower max_tokens"
        )


@dataclass(frozen=True)
class SteerablePrompts:
    """Prompt building for one trained generator, from its folder's tokenizer and SFT config."""

    folder: Path
    config: SFTDataConfig
    tokenizer: Any
    context: int  # tokens: the training max_length, or the model's positions if fewer
    stop_ids: tuple[int, ...]  # the trained end-of-turn marker
    # Where the APM's scores fall on this model's levels (its apm_quantile cut points; none: the
    # APM's own 0-4 scale, also for levels ranked within each prompt, which have no cut points).
    levels: LevelScale = LevelScale()

    @classmethod
    def load(cls, folder: str | Path) -> SteerablePrompts:
        from transformers import AutoConfig

        folder = Path(folder)
        load_and_check_schema(folder, SCHEMA)
        config = SFTDataConfig.model_validate(read_training_setup(folder)["examples"])
        tokenizer = load_generator_tokenizer(str(folder))
        prepare_tokenizer_for_template(tokenizer, None, config.template)
        positions = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
        context = min(config.max_length, int(positions)) if positions else config.max_length
        levels = LevelScale.read(folder, SCHEMA) or LevelScale()
        return cls(folder, config, tokenizer, context, (end_of_turn_id(tokenizer, config.template),), levels)

    def prompt_ids(
        self,
        turns: Sequence[Turn],
        attributes: Mapping[str, int] | None,
        max_new_tokens: int,
        system: str | None = None,
    ) -> list[int]:
        """The ids the model continues; raises `PromptTooLong` rather than trimming the history.

        `system` replaces the trained system text (`config.system`) when given.
        """
        update: dict[str, Any] = {"max_length": _UNLIMITED}
        if system is not None:
            update["system"] = system
        ids = generation_prompt_ids(
            turns, attributes, self.tokenizer, self.config.model_copy(update=update), SCHEMA
        )
        if len(ids) + max_new_tokens > self.context:
            raise PromptTooLong(len(ids), max_new_tokens, self.context)
        return ids
