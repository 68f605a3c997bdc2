"""Synthetic OpenAssistant message trees with planted labels: the embedded default's second
labelled source, in the export format `helpsteer_core.oasst` reads (one tree a JSON line).

    write_synthetic_oasst("runs/data/oasst", trees=300, seed=1)   # trees.jsonl + manifest.json

A tree's prompt and answers are the synthetic HelpSteer generator's (`helpsteer_core.synthetic`,
single-turn prompts, 1-3 answers a prompt), so their texts carry its signals; an answer's four
OpenAssistant labels are planted as follows (the known answer), each a mean in 0-1 over 1-5
raters that is exactly level / 4, so `oasst.to_attribute_value` gives the level back:

quality: the synthetic row's helpfulness (itself a function of correctness, coherence and length).
humor, creativity, toxicity: a level drawn per answer (humor and creativity uniform over 0-4;
    toxicity 0 on 70% of answers, else uniform over 1-4); a level above 0 adds one sentence from
    that level's bank (`HUMOR`, `CREATIVITY`, `TOXICITY`) after the answer's first sentence (humor
    and creativity) or before it (toxicity), so each label is read from a sentence of its own.

A tree is conversational: with probability `follow_up_fraction` one answer gets a user follow-up
(the next synthetic prompt) and its own labelled answers below it, so a root-to-leaf path has two
assistant turns. 10% of answers carry no labels (an unreviewed message), and 3% of messages
are marked deleted. Message ids are UUIDs drawn from the seeded generator, so the same arguments
give byte-identical files in any process.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from itertools import groupby
from pathlib import Path
from typing import Any

from helpsteer_core.config import ConfigError
from helpsteer_core.synthetic import MANIFEST, check_own_folder, generate, write_manifest

GENERATOR = "synthetic-oasst"  # the name its manifest carries
GENERATOR_VERSION = 1
TREES_FILE = "synthetic-oasst.trees.jsonl"
ANSWERS_PER_PROMPT = (1, 3)
FOLLOW_UP_FRACTION = 0.3
UNLABELLED_FRACTION = 0.1
DELETED_FRACTION = 0.03
TOXIC_FRACTION = 0.3

# Level 1-4 sentences; level 0 adds none.
HUMOR = (
    "That is a neat little fact to share.",
    "Fun fact, it even makes a decent party trivia question.",
    "If facts were snacks, this one would be a crunchy pretzel.",
    "Ha, my calculator laughed so hard at this one that its battery fell out.",
)
CREATIVITY = (
    "Put another way, it is a simple idea.",
    "Picture it as a road sign pointing the way.",
    "Imagine the idea as a lantern carried through a winding cave of questions.",
    "Think of it as a comet stitching silver thread across the velvet quilt of night.",
)
TOXICITY = (
    "Honestly, you could have looked this up.",
    "This is a lazy question, but fine.",
    "Only a careless person would need to ask this.",
    "What a stupid question from a clueless person.",
)
_BANKS = {"humor": HUMOR, "creativity": CREATIVITY, "toxicity": TOXICITY}


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _label(level: int, rng: random.Random) -> dict[str, Any]:
    return {"value": level / 4, "count": rng.randint(1, 5)}


def _answer(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """An assistant message for a synthetic row: planted sentences in, labels on."""
    levels = {
        "humor": rng.randint(0, 4),
        "creativity": rng.randint(0, 4),
        "toxicity": rng.randint(1, 4) if rng.random() < TOXIC_FRACTION else 0,
    }
    first, _, rest = row["response"].partition(". ")
    sentences = [first if not rest else first + "."]
    for name in ("humor", "creativity"):
        if levels[name]:
            sentences.append(_BANKS[name][levels[name] - 1])
    if rest:
        sentences.append(rest)
    if levels["toxicity"]:
        sentences.insert(0, TOXICITY[levels["toxicity"] - 1])
    message = _message(" ".join(sentences), "assistant", rng)
    if rng.random() >= UNLABELLED_FRACTION:
        labels = {"quality": _label(int(row["helpfulness"]), rng)}
        labels.update({name: _label(level, rng) for name, level in levels.items()})
        message["labels"] = labels
    return message


def _message(text: str, role: str, rng: random.Random) -> dict[str, Any]:
    return {
        "message_id": _uuid(rng),
        "text": text,
        "role": role,
        "lang": "en",
        "deleted": rng.random() < DELETED_FRACTION,
        "replies": [],
    }


def generate_trees(
    trees: int, seed: int, follow_up_fraction: float = FOLLOW_UP_FRACTION
) -> list[dict[str, Any]]:
    """Exactly `trees` message trees; the same arguments give the same trees in any process."""
    if isinstance(trees, bool) or not isinstance(trees, int) or trees < 1:
        raise ConfigError(f"trees={trees!r}: allowed: an integer >= 1")
    if not 0.0 <= follow_up_fraction <= 1.0:
        raise ConfigError(f"follow_up_fraction={follow_up_fraction!r}: allowed: 0.0 to 1.0")
    rng = random.Random(seed)
    # Up to two prompts a tree, at most three answers each: enough rows for every tree.
    rows = generate(trees * 2 * ANSWERS_PER_PROMPT[1], seed, ANSWERS_PER_PROMPT, multi_turn_fraction=0.0)
    groups = iter([list(g) for _, g in groupby(rows, key=lambda r: r["prompt"])])
    out: list[dict[str, Any]] = []
    for _ in range(trees):
        first = next(groups)
        root = _message(first[0]["prompt"], "prompter", rng)
        root["replies"] = [_answer(row, rng) for row in first]
        if rng.random() < follow_up_fraction:
            second = next(groups)
            follow_up = _message(second[0]["prompt"], "prompter", rng)
            follow_up["replies"] = [_answer(row, rng) for row in second]
            rng.choice(root["replies"])["replies"] = [follow_up]
        out.append({"message_tree_id": root["message_id"], "tree_state": "ready_for_export", "prompt": root})
    return out


def write_synthetic_oasst(out_dir: str | Path, trees: int, seed: int) -> Path:
    """Write `generate_trees(trees, seed)` as one `.trees.jsonl` file plus `manifest.json`.

    Refuses a non-empty folder without this generator's manifest (it is someone else's data); an
    earlier output of it is replaced. The manifest is written last, so a folder holding one is
    complete."""
    out = Path(out_dir)
    check_own_folder(out, GENERATOR)
    data = generate_trees(trees, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # only ever ours: check_own_folder passed
    path = out / TREES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(tree, ensure_ascii=False) + "\n" for tree in data), encoding="utf-8")
    os.replace(tmp, path)
    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "trees": trees,
        "seed": seed,
        "files": [path.name],
    }
    write_manifest(out, manifest)
    return path
