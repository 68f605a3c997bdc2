"""SteerLM's bootstrapping round, the parts that need no Ray: targets, distances and the choice.

The tuned generator answers each prompt `candidates` times at a target (some attributes drawn at
random, the rest at a profile's defaults), the APM scores every candidate, and one candidate per
(prompt, target) is kept as a new AC-SFT row labelled with the APM's predictions: the closest to
the target (Euclidean distance between the APM's scores and the requested values over the drawn
attributes, as `/v1/steer` ranks), or the one the APM scores highest on an attribute. The scores
are placed on the generator's own levels first (`LevelScale`: a model trained on the APM's
predictions ranked into levels learnt level k from a band of predictions, not from k itself);
`level_<name>` keeps where each landed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from helpsteer_core.attributes import STEERLM, AttributeSchema, LevelScale
from helpsteer_core.config import ConfigError

Selection = Literal["closest", "highest"]


@dataclass(frozen=True)
class Target:
    """One (prompt, requested attributes) pair; `drawn` are the attributes that vary."""

    prompt_id: int
    target_id: int
    prompt: str
    attributes: Mapping[str, int]
    drawn: tuple[str, ...]


def check_attributes(names: Sequence[str], where: str, schema: AttributeSchema = STEERLM) -> None:
    unknown = [name for name in names if name not in schema.names]
    if unknown or not names:
        raise ConfigError(f"{where}: {list(names)}; allowed: a non-empty list of {', '.join(schema.names)}")


def draw_targets(
    prompts: Sequence[str],
    vary: Sequence[str],
    per_prompt: int,
    defaults: Mapping[str, int],
    seed: int,
    schema: AttributeSchema = STEERLM,
) -> list[Target]:
    """`per_prompt` targets for each prompt: each `vary` attribute drawn uniformly from the
    schema's range (seeded), the others at `defaults`."""
    check_attributes(vary, "vary", schema)
    draw = random.Random(seed)
    targets = []
    for prompt_id, prompt in enumerate(prompts):
        for index in range(per_prompt):
            values = {name: draw.randint(schema.low, schema.high) for name in vary}
            targets.append(
                Target(prompt_id, prompt_id * per_prompt + index, prompt, {**defaults, **values}, tuple(vary))
            )
    return targets


def distance(scores: Mapping[str, float], requested: Mapping[str, int], names: Sequence[str]) -> float:
    """Euclidean distance between the APM's scores and the requested values over `names`."""
    return math.sqrt(sum((float(scores[name]) - requested[name]) ** 2 for name in names))


def choose(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], selection: Selection, highest_of: str
) -> list[dict[str, Any]]:
    """One row per `target_id`: the smallest `distance` (closest) or the largest `apm_<highest_of>`
    (highest); ties go to the lower `candidate`. Rows carry `target_<name>` and `apm_<name>`."""
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(int(row["target_id"]), []).append(row)
    chosen = []
    for target_id in sorted(groups):
        group = groups[target_id]
        if selection == "closest":
            best = min(group, key=lambda r: (r["distance"], r["candidate"]))
        else:
            best = min(group, key=lambda r: (-float(r[f"apm_{highest_of}"]), r["candidate"]))
        chosen.append({**best, "chosen_from": len(group)})
    return chosen


def scored_row(
    row: Mapping[str, Any], names: Sequence[str], scale: LevelScale = LevelScale()
) -> dict[str, Any]:
    """`row` (a relabelled candidate) with its APM scores placed on the generator's levels
    (`level_<name>`; the APM's own scale without `scale`) and their `distance` to its target."""
    placed = scale.placed({name: float(row[f"apm_{name}"]) for name in names})
    requested = {name: int(row[f"target_{name}"]) for name in names}
    return {
        **row,
        **{f"level_{name}": placed[name] for name in names},
        "distance": round(distance(placed, requested, names), 6),
    }


def mean_gaps(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Mean |APM - requested| per attribute (the scores placed on the generator's levels,
    `scored_row`) and the mean Euclidean distance, over `rows`."""
    if not rows:
        return {"rows": 0, "distance": None, "per_attribute": {}}
    return {
        "rows": len(rows),
        "distance": round(sum(float(r["distance"]) for r in rows) / len(rows), 4),
        "per_attribute": {
            name: round(
                sum(abs(float(r[f"level_{name}"]) - int(r[f"target_{name}"])) for r in rows) / len(rows), 4
            )
            for name in names
        },
    }
