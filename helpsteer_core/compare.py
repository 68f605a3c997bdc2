"""Evaluation runs side by side, in the shape of the HelpSteer paper's ablation table.

    helpsteer compare runs/eval-full runs/eval-no-complexity --out runs/compare

Each EVAL_DIR is an evaluate stage output (`metrics.json`, `responses.parquet`,
`evaluate_config.yaml`, optionally `mt_bench/<judge>_scores.json`). Per run: what its generator's
attribute line carried (`examples.condition_on` of the generator's `sft_config.yaml`), the
steerability of every swept attribute (Spearman's rho within prompt, on the real-style prompts
where the attribute was swept on them, else on the synthetic ones), the APM's mean scores of the
tuned model's answers at the default attributes, relevance against the untuned model, and the
MT-Bench score when the answers were judged. The untuned model of the first run is a row too.

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, STEERLM
from helpsteer_core.steering import TEXT_MEASURES

TUNED, BASELINE = "tuned", "baseline"


class CompareError(ValueError):
    """An evaluation folder that cannot be compared; the message names the file."""


@dataclass
class RunSummary:
    name: str
    folder: Path
    model: str  # "tuned" or "baseline" (the first run's untuned model)
    generator: str
    conditioned_on: list[str] | None  # None: every attribute (or unknown, see conditioned_note)
    conditioned_note: str
    # attribute -> {"prompt_set", "prompts", "text", "text_measure", "apm"}: within-prompt rho
    steer: dict[str, dict[str, Any]] = field(default_factory=dict)
    apm_at_defaults: dict[str, float] = field(default_factory=dict)  # mean APM score, defaults asked
    answers_at_defaults: int = 0
    relevance: float | None = None  # mean prompt-answer cosine at the defaults (real prompts)
    mt_bench: float | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: not found; is {path.parent} an evaluate stage output?") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON: {exc}") from None


def _conditioning(generator: str) -> tuple[list[str] | None, str]:
    setup = Path(generator) / "sft_config.yaml"
    if not setup.is_file():
        return None, f"unknown ({setup} not found)"
    examples = (yaml.safe_load(setup.read_text()) or {}).get("examples") or {}
    names = examples.get("condition_on")
    return names, "all" if names is None else ", ".join(names)


def _steer(results: Mapping[str, Any], model: str, prompt_set: str) -> dict[str, dict[str, Any]]:
    steer: dict[str, dict[str, Any]] = {}
    for attribute, figures in (results.get(model) or {}).items():
        by_measure = {f["measure"]: f for f in figures}
        text_key = TEXT_MEASURES.get(attribute)
        text = by_measure.get(text_key) if text_key else None
        apm = by_measure.get(f"apm_{attribute}")
        first = text or apm
        if first is None:
            continue
        steer[attribute] = {
            "prompt_set": prompt_set,
            "prompts": first["prompts"],
            "text_measure": text_key if text else None,
            "text": text["within_prompt"] if text else None,
            "apm": apm["within_prompt"] if apm else None,
        }
    return steer


def _mt_bench(folder: Path, model: str) -> float | None:
    """The judged MT-Bench score of `model` (its answers are `model_answer/helpsteer-<model>.jsonl`)."""
    for path in sorted((folder / "mt_bench").glob("*_scores.json")):
        score = (_read_json(path).get(f"helpsteer-{model}") or {}).get("score")
        if isinstance(score, (int, float)):
            return float(score)
    return None


def read_run(folder: str | Path, name: str | None = None, model: str = TUNED) -> RunSummary:
    """One evaluation folder's figures for `model` (tuned, or baseline: the untuned model)."""
    folder = Path(folder)
    metrics = _read_json(folder / "metrics.json")
    config_path = folder / "evaluate_config.yaml"
    if not config_path.is_file():
        raise CompareError(f"{config_path}: not found; is {folder} an evaluate stage output?")
    config = yaml.safe_load(config_path.read_text()) or {}
    generator = str(config.get("generator", "?"))
    defaults_name = config.get("defaults", "helpsteer2")
    if defaults_name not in DEFAULT_ATTRIBUTES:
        raise CompareError(
            f"{config_path}: defaults {defaults_name!r}; allowed: {', '.join(DEFAULT_ATTRIBUTES)}"
        )
    defaults = DEFAULT_ATTRIBUTES[defaults_name]
    if model == TUNED:
        conditioned, note = _conditioning(generator)
    else:
        conditioned, note = None, "untuned (no attribute line)"
    run = RunSummary(
        name=name or folder.name if model == TUNED else f"untuned ({name or folder.name})",
        folder=folder,
        model=model,
        generator=generator if model == TUNED else str(metrics.get("setup", {}).get("baseline", "?")),
        conditioned_on=conditioned,
        conditioned_note=note,
    )
    # Real-style prompts first: an attribute swept on both reports the real sweep.
    run.steer = _steer(metrics.get("results") or {}, model, "synthetic")
    run.steer |= _steer(metrics.get("real_results") or {}, model, "real")
    responses = folder / "responses.parquet"
    if responses.is_file():
        rows = pq.read_table(responses).to_pylist()
        at_defaults = [
            r
            for r in rows
            if r["model"] == model and r["prompt_set"] == "real" and json.loads(r["attributes"]) == defaults
        ]
        answers = list({r["prompt_id"]: r for r in reversed(at_defaults)}.values())  # one per prompt
        run.answers_at_defaults = len(answers)
        for attribute in STEERLM.names:
            values = [r.get(f"apm_{attribute}") for r in answers]
            present = [float(v) for v in values if v is not None and not math.isnan(v)]
            if present:
                run.apm_at_defaults[attribute] = float(np.mean(present))
    relevance = (metrics.get("relevance") or {}).get(model) or {}
    run.relevance = relevance.get("mean_cosine")
    run.mt_bench = _mt_bench(folder, model)
    return run


def compare_runs(folders: Sequence[str | Path], names: Sequence[str] | None = None) -> list[RunSummary]:
    """The tuned model of every folder, then the untuned model of the first (when it has one)."""
    if not folders:
        raise CompareError("no evaluation folders to compare")
    if names is not None and len(names) != len(folders):
        raise CompareError(f"{len(names)} names for {len(folders)} folders; give one name per folder or none")
    runs = [read_run(f, None if names is None else names[i]) for i, f in enumerate(folders)]
    if len({r.name for r in runs}) < len(runs):
        raise CompareError(f"two runs share a name ({[r.name for r in runs]}); name them with --name")
    first = _read_json(Path(folders[0]) / "metrics.json")
    if BASELINE in (first.get("results") or {}):
        runs.append(read_run(folders[0], runs[0].name, BASELINE))
    return runs


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render_comparison(runs: Sequence[RunSummary]) -> str:
    """compare.md: setup, the steerability table, the APM's scores at the defaults, MT-Bench."""
    swept = [a for a in STEERLM.names if any(a in r.steer for r in runs)]
    scored = [a for a in STEERLM.names if any(a in r.apm_at_defaults for r in runs)]
    lines = [
        "# Runs compared",
        "",
        "In the shape of the HelpSteer paper's ablation table: per run, what its attribute line "
        "carried, how well each attribute steers (Spearman's rho between the requested level "
        "and the measure, averaged within prompt: text measure / the APM), and the APM's mean "
        "scores of its answers at the default attributes.",
        "",
        "| run | conditioned on | generator | evaluation |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.conditioned_note} | `{r.generator}` | `{r.folder}` |" for r in runs]
    lines += ["", "## Steerability (within-prompt rho: text measure / APM)", ""]
    lines.append("| run | " + " | ".join(swept) + " |")
    lines.append("|---|" + "---|" * len(swept))
    for r in runs:
        cells = []
        for attribute in swept:
            figures = r.steer.get(attribute)
            if figures is None:
                cells.append("-")
                continue
            text = f"{_cell(figures['text'])} / " if figures["text_measure"] else ""
            cells.append(f"{text}{_cell(figures['apm'])}")
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    swept_figures = [(a, f) for r in runs for a, f in r.steer.items()]
    sets = sorted({f"{a}: {f['prompts']} {f['prompt_set']} prompts" for a, f in swept_figures})
    measures = sorted({f"{a}: {f['text_measure']}" for a, f in swept_figures if f["text_measure"]})
    lines += ["", f"Prompts: {'; '.join(sets)}. Text measures: {'; '.join(measures) or 'none'}.", ""]
    lines += ["## The APM's mean scores at the default attributes", ""]
    header = " | ".join(scored)
    lines += [f"| run | answers | {header} | relevance | MT-Bench |"]
    lines += ["|---|---|" + "---|" * (len(scored) + 2)]
    for r in runs:
        cells = [_cell(r.apm_at_defaults.get(a)) for a in scored]
        lines.append(
            f"| {r.name} | {r.answers_at_defaults} | "
            + " | ".join(cells)
            + f" | {_cell(r.relevance, 3)} | {_cell(r.mt_bench)} |"
        )
    lines += [
        "",
        "Relevance: mean prompt-answer cosine at the defaults on the real-style prompts. MT-Bench: "
        "the judged score (`helpsteer judge`), '-' where the answers were not judged.",
        "",
    ]
    return "\n".join(lines)


def plot_comparison(runs: Sequence[RunSummary], path: Path) -> None:
    """Grouped bars: each attribute's steerability (the APM measure) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [a for a in STEERLM.names if any(a in r.steer for r in runs)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(swept) + 2), 4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        values = [(r.steer.get(a) or {}).get("apm") for a in swept]
        xs = [j + i * width for j in range(len(swept))]
        ax.bar(xs, [np.nan if v is None else v for v in values], width, label=r.name)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(swept))], swept)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylim(-1, 1)
    ax.set_ylabel("Spearman rho within prompt (APM)")
    ax.set_title("Steerability per attribute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(
    folders: Sequence[str | Path], out: Path, names: Sequence[str] | None = None
) -> list[RunSummary]:
    """compare.md, compare.json and compare.png in `out` (created; existing files of these names are
    replaced, nothing else is touched)."""
    runs = compare_runs(folders, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(render_comparison(runs))
    payload = [{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(r).items()} for r in runs]
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_comparison(runs, out / "compare.png")
    return runs


__all__ = ["CompareError", "RunSummary", "compare_runs", "read_run", "render_comparison", "write_comparison"]
