"""APM agreement metrics and the prediction plot: known answers for perfect, constant and masked
predictions, the training-mean baseline, and a PNG that is really written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpsteer_core.attributes import HELPSTEER, STEERLM
from helpsteer_core.metrics import attribute_metrics, label_means, plot_predictions

N_ATTR = len(STEERLM.names)


def labelled_data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Human labels 0..4 for the five HelpSteer attributes; the OpenAssistant four unlabelled."""
    rng = np.random.default_rng(seed)
    human = rng.integers(0, 5, size=(n, N_ATTR)).astype(np.float64)
    mask = np.zeros((n, N_ATTR), dtype=bool)
    for name in HELPSTEER.names:
        mask[:, STEERLM.index(name)] = True
    human[~mask] = np.nan
    return human, mask


def test_perfect_predictions_score_perfectly_and_beat_the_baseline() -> None:
    human, mask = labelled_data()
    pred = np.where(mask, human, 0.0)
    result = attribute_metrics(pred, human, mask, label_means(human, mask), STEERLM)
    assert list(result) == list(HELPSTEER.names)  # only attributes with labels, in schema order
    for scores in result.values():
        assert scores["n"] == 200
        assert scores["pearson"] == pytest.approx(1.0)
        assert scores["spearman"] == pytest.approx(1.0)
        assert scores["mae"] == 0.0 and scores["rmse"] == 0.0
        assert scores["qwk"] == pytest.approx(1.0)
        assert scores["baseline_rmse"] is not None and scores["baseline_rmse"] > 1.0  # type: ignore[operator]
        assert scores["beats_baseline_rmse"] is True


def test_constant_predictions_have_no_correlation_and_serialise_without_nan() -> None:
    human, mask = labelled_data()
    pred = np.full(human.shape, 2.0)
    result = attribute_metrics(pred, human, mask, np.full(N_ATTR, 2.0), STEERLM)
    for scores in result.values():
        assert scores["pearson"] is None and scores["spearman"] is None
        assert scores["baseline_pearson"] is None and scores["baseline_spearman"] is None
        # Predicting the training mean is the baseline itself: equal, so not better.
        assert scores["rmse"] == scores["baseline_rmse"]
        assert scores["beats_baseline_rmse"] is False
        assert scores["qwk"] == pytest.approx(0.0)
    json.dumps(result, allow_nan=False)


def test_baseline_scores_by_hand() -> None:
    human = np.zeros((4, N_ATTR))
    mask = np.zeros((4, N_ATTR), dtype=bool)
    j = STEERLM.index("verbosity")
    human[:, j] = [0, 1, 3, 4]
    mask[:, j] = True
    pred = np.zeros((4, N_ATTR))
    pred[:, j] = [0.4, 1.2, 2.6, 4.4]
    train_mean = np.full(N_ATTR, np.nan)
    train_mean[j] = 1.5
    scores = attribute_metrics(pred, human, mask, train_mean, STEERLM)["verbosity"]
    assert scores["mae"] == pytest.approx((0.4 + 0.2 + 0.4 + 0.4) / 4)
    assert scores["rmse"] == pytest.approx(np.sqrt((0.16 + 0.04 + 0.16 + 0.16) / 4))
    assert scores["baseline_mae"] == pytest.approx((1.5 + 0.5 + 1.5 + 2.5) / 4)
    assert scores["baseline_rmse"] == pytest.approx(np.sqrt((2.25 + 0.25 + 2.25 + 6.25) / 4))
    assert scores["qwk"] == pytest.approx(1.0)  # rounded: 0, 1, 3, 4
    assert scores["beats_baseline_rmse"] is True


def test_the_mask_excludes_entries() -> None:
    human, mask = labelled_data(n=50)
    j = STEERLM.index("coherence")
    mask[10:, j] = False  # only 10 coherence labels
    pred = np.where(mask, human + 0.25, 0.0)
    garbage = pred.copy()
    garbage[~mask] = 1e9  # unlabelled entries: wild predictions, garbage "human" values
    human_garbage = human.copy()
    human_garbage[~mask] = 17.5
    train_mean = label_means(human, mask)
    clean = attribute_metrics(pred, human, mask, train_mean, STEERLM)
    dirty = attribute_metrics(garbage, human_garbage, mask, train_mean, STEERLM)
    assert clean == dirty
    assert clean["coherence"]["n"] == 10 and clean["helpfulness"]["n"] == 50
    assert "quality" not in clean
    assert clean["coherence"]["mae"] == pytest.approx(0.25)


def test_label_means_ignore_unlabelled_entries() -> None:
    human, mask = labelled_data(n=30)
    means = label_means(human, mask)
    assert np.isnan(means[STEERLM.index("quality")])
    j = STEERLM.index("helpfulness")
    assert means[j] == pytest.approx(human[:, j].mean())


def test_a_nan_train_mean_gives_no_baseline() -> None:
    human, mask = labelled_data(n=20)
    result = attribute_metrics(np.where(mask, human, 0), human, mask, np.full(N_ATTR, np.nan), STEERLM)
    scores = result["correctness"]
    assert scores["baseline_rmse"] is None and scores["baseline_qwk"] is None
    assert scores["beats_baseline_rmse"] is False


def test_bad_inputs_are_refused() -> None:
    human, mask = labelled_data(n=5)
    with pytest.raises(ValueError, match="human label 2.5"):
        bad = human.copy()
        bad[0, STEERLM.index("helpfulness")] = 2.5
        attribute_metrics(np.zeros_like(human), bad, mask, np.zeros(N_ATTR), STEERLM)
    with pytest.raises(ValueError, match=r"expected \(n, 9\)"):
        attribute_metrics(np.zeros((5, 5)), human, mask, np.zeros(N_ATTR), STEERLM)
    with pytest.raises(ValueError, match="non-finite"):
        pred = np.zeros_like(human)
        pred[0, STEERLM.index("verbosity")] = np.nan
        attribute_metrics(pred, human, mask, np.zeros(N_ATTR), STEERLM)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    human, mask = labelled_data(n=80)
    rng = np.random.default_rng(1)
    pred = np.where(mask, human + rng.normal(0, 0.5, human.shape), 0.0)
    path = plot_predictions(pred, human, mask, STEERLM, tmp_path / "plots" / "apm.png")
    assert path == tmp_path / "plots" / "apm.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_labels_still_writes_a_png(tmp_path: Path) -> None:
    pred = np.zeros((3, N_ATTR))
    path = plot_predictions(pred, pred, np.zeros((3, N_ATTR), dtype=bool), STEERLM, tmp_path / "empty.png")
    assert path.stat().st_size > 0
