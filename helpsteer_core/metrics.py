"""Agreement of APM predictions with human attribute labels, and a plot of it.

`attribute_metrics` scores every attribute that has labels: Pearson and Spearman correlation,
MAE, RMSE, and quadratic-weighted kappa (QWK, on predictions rounded and clipped to the schema's
range, as relabelling writes them). Each score comes with the same score for the baseline that
always predicts the training set's mean label, so "the APM learned something" is a comparison,
not a feeling: `beats_baseline_rmse` says whether the APM's RMSE is below the baseline's.

Correlations of a constant (a baseline, or a collapsed model) are undefined: they are reported as
None, never NaN, so the result serialises to JSON and MLflow as it is.

`plot_predictions` draws predicted against human labels per attribute into one PNG, with
matplotlib's Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from helpsteer_core.attributes import AttributeSchema

MetricValue = float | int | bool | None


def _as_arrays(
    pred: np.ndarray, human: np.ndarray, mask: np.ndarray, schema: AttributeSchema
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    h = np.asarray(human, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    n_attr = len(schema.names)
    if p.ndim != 2 or p.shape[1] != n_attr:
        raise ValueError(f"pred has shape {p.shape}; expected (n, {n_attr}) for schema {schema.id}")
    if h.shape != p.shape or m.shape != p.shape:
        raise ValueError(f"shapes differ: pred {p.shape} human {h.shape} mask {m.shape}")
    return p, h, m


def label_means(human: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n_attr,) mean label per attribute over labelled rows; NaN where an attribute has none.

    This is the `train_mean` that `attribute_metrics` expects, computed on the training split.
    """
    h = np.asarray(human, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    counts = m.sum(axis=0)
    sums = np.where(m, h, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson or Spearman r, or None when undefined (fewer than 2 points, or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.pearsonr(x, y)[0] if kind == "pearson" else stats.spearmanr(x, y)[0]
    value = float(r)
    return value if math.isfinite(value) else None


def _qwk(human: np.ndarray, labels: np.ndarray, schema: AttributeSchema) -> float | None:
    """Quadratic-weighted kappa over the schema's labels; None when undefined (0/0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(
            cohen_kappa_score(
                human, labels, labels=list(range(schema.low, schema.high + 1)), weights="quadratic"
            )
        )
    return value if math.isfinite(value) else None


def round_clip(preds: np.ndarray, schema: AttributeSchema) -> np.ndarray:
    """Integer labels for relabel output: round half up, then clip to the schema's range.

    The clipping is deliberate and only here; callers keep the float predictions beside these.
    NaN predictions raise (a NaN has no label).
    """
    values = np.asarray(preds, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError(f"round_clip: {int(np.isnan(values).sum())} NaN predictions")
    return np.clip(np.floor(values + 0.5), schema.low, schema.high).astype(np.int64)


def attribute_metrics(
    pred: np.ndarray,
    human: np.ndarray,
    mask: np.ndarray,
    train_mean: np.ndarray,
    schema: AttributeSchema,
) -> dict[str, dict[str, MetricValue]]:
    """Scores per attribute that has at least one label; pred/human/mask are (n, n_attr).

    Keys per attribute: n, pearson, spearman, mae, rmse, qwk; baseline_pearson and
    baseline_spearman (always None: a constant has no correlation), baseline_mae, baseline_rmse,
    baseline_qwk; beats_baseline_rmse. A NaN train mean (no training labels for that attribute)
    gives None baseline scores and beats_baseline_rmse False.
    """
    p, h, m = _as_arrays(pred, human, mask, schema)
    means = np.asarray(train_mean, dtype=np.float64)
    if means.shape != (len(schema.names),):
        raise ValueError(f"train_mean has shape {means.shape}; expected ({len(schema.names)},)")
    result: dict[str, dict[str, MetricValue]] = {}
    for j, name in enumerate(schema.names):
        rows = m[:, j]
        if not rows.any():
            continue
        x, y = h[rows, j], p[rows, j]  # human, predicted
        if not np.isfinite(y).all():
            raise ValueError(f"attribute {name!r}: {int((~np.isfinite(y)).sum())} non-finite predictions")
        human_int = np.rint(x)
        bad = (human_int != x) | (human_int < schema.low) | (human_int > schema.high)
        if bad.any():
            raise ValueError(
                f"attribute {name!r}: human label {float(x[bad][0])!r} is not {schema.allowed()}"
            )
        human_labels = human_int.astype(np.int64)
        err = y - x
        rmse = float(np.sqrt((err**2).mean()))
        scores: dict[str, MetricValue] = {
            "n": int(rows.sum()),
            "pearson": _correlation("pearson", x, y),
            "spearman": _correlation("spearman", x, y),
            "mae": float(np.abs(err).mean()),
            "rmse": rmse,
            "qwk": _qwk(human_labels, round_clip(y, schema), schema),
            "baseline_pearson": None,
            "baseline_spearman": None,
        }
        mean = float(means[j])
        if math.isfinite(mean):
            base_err = mean - x
            base_rmse = float(np.sqrt((base_err**2).mean()))
            scores["baseline_mae"] = float(np.abs(base_err).mean())
            scores["baseline_rmse"] = base_rmse
            constant = round_clip(np.full_like(x, mean), schema)
            scores["baseline_qwk"] = _qwk(human_labels, constant, schema)
            scores["beats_baseline_rmse"] = rmse < base_rmse
        else:
            scores.update(baseline_mae=None, baseline_rmse=None, baseline_qwk=None, beats_baseline_rmse=False)
        result[name] = scores
    return result


def plot_predictions(
    pred: np.ndarray,
    human: np.ndarray,
    mask: np.ndarray,
    schema: AttributeSchema,
    path: str | Path,
    seed: int = 0,
) -> Path:
    """One PNG with a scatter per labelled attribute: predicted (y) against human (x, jittered).

    Each panel has the y = x line and the Pearson r in its title. With no labelled attribute the
    PNG says so instead of being silently empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p, h, m = _as_arrays(pred, human, mask, schema)
    labelled = [j for j in range(len(schema.names)) if m[:, j].any()]
    cols = max(1, min(3, len(labelled)))
    rows = max(1, math.ceil(len(labelled) / cols))
    fig = Figure(figsize=(4.0 * cols, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(seed)
    lo, hi = schema.low - 0.5, schema.high + 0.5
    if not labelled:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no labelled attributes", ha="center", va="center")
        ax.set_axis_off()
    for k, j in enumerate(labelled):
        ax = fig.add_subplot(rows, cols, k + 1)
        sel = m[:, j]
        x, y = h[sel, j], p[sel, j]
        # Human labels are integers: jitter them so that points on one label do not hide each other.
        ax.scatter(x + rng.uniform(-0.15, 0.15, size=len(x)), y, s=8, alpha=0.5)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--")
        r = _correlation("pearson", x, y)
        r_text = "n/a" if r is None else f"{r:.3f}"
        ax.set_title(f"{schema.names[j]}: pearson {r_text} (n={len(x)})", fontsize=10)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("human")
        ax.set_ylabel("predicted")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
