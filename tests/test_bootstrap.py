"""SteerLM bootstrapping's logic without Ray (helpsteer_core.bootstrap): the targets, the distance
and the choice. The stage itself runs in tests/test_pipeline.py."""

from __future__ import annotations

import json
import math

import pytest

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, LEVELS_FILE, LevelScale
from helpsteer_core.bootstrap import choose, distance, draw_targets, mean_gaps, scored_row
from helpsteer_core.config import ConfigError
from helpsteer_core.readers import SourceError

DEFAULTS = DEFAULT_ATTRIBUTES["helpsteer2"]


def test_targets_draw_the_varied_attributes_in_range_and_keep_the_rest_at_the_defaults():
    targets = draw_targets(["q0", "q1", "q2"], ["verbosity", "complexity"], 4, DEFAULTS, seed=3)
    assert [t.target_id for t in targets] == list(range(12))
    assert [t.prompt for t in targets[:5]] == ["q0"] * 4 + ["q1"]
    for target in targets:
        assert {k: v for k, v in target.attributes.items() if k not in target.drawn} == {
            k: v for k, v in DEFAULTS.items() if k not in ("verbosity", "complexity")
        }
        assert all(0 <= target.attributes[n] <= 4 for n in target.drawn)
    drawn = {(t.attributes["verbosity"], t.attributes["complexity"]) for t in targets}
    assert len(drawn) > 3  # they vary
    assert draw_targets(["q0", "q1", "q2"], ["verbosity", "complexity"], 4, DEFAULTS, seed=3) == targets


def test_an_unknown_attribute_to_vary_is_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match="vary: \\['length'\\]; allowed: a non-empty list of quality"):
        draw_targets(["q"], ["length"], 1, DEFAULTS, seed=0)


def _candidate(target_id: int, candidate: int, verbosity: float, complexity: float, helpful: float = 2.0):
    row = {
        "target_id": target_id,
        "candidate": candidate,
        "target_verbosity": 4,
        "target_complexity": 0,
        "apm_verbosity": verbosity,
        "apm_complexity": complexity,
        "apm_helpfulness": helpful,
    }
    return scored_row(row, ["verbosity", "complexity"])


def test_the_closest_candidate_per_target_is_chosen_ties_to_the_first():
    rows = [
        _candidate(0, 0, 2.0, 2.0),  # distance sqrt(8)
        _candidate(0, 1, 3.5, 0.5),  # sqrt(0.5): the closest
        _candidate(0, 2, 3.5, 0.5),  # the same: the earlier candidate wins
        _candidate(1, 0, 0.0, 4.0, helpful=3.9),
        _candidate(1, 1, 4.0, 1.0, helpful=1.0),
    ]
    assert rows[1]["distance"] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    chosen = choose(rows, ["verbosity", "complexity"], "closest", "helpfulness")
    assert [(r["target_id"], r["candidate"], r["chosen_from"]) for r in chosen] == [(0, 1, 3), (1, 1, 2)]
    highest = choose(rows, ["verbosity", "complexity"], "highest", "helpfulness")
    assert [(r["target_id"], r["candidate"]) for r in highest] == [(0, 0), (1, 0)]
    gaps = mean_gaps(chosen, ["verbosity", "complexity"])
    assert gaps["rows"] == 2
    assert gaps["per_attribute"] == {"verbosity": pytest.approx(0.25), "complexity": pytest.approx(0.75)}
    assert gaps["distance"] == pytest.approx((math.sqrt(0.5) + 1.0) / 2, abs=1e-4)
    assert mean_gaps([], ["verbosity"]) == {"rows": 0, "distance": None, "per_attribute": {}}
    assert distance({"verbosity": 1.0}, {"verbosity": 4}, ["verbosity"]) == 3.0


def test_scores_are_compared_on_the_generators_levels_when_it_learnt_ranked_ones():
    """A model trained on apm_quantile levels learnt level k from a band of APM predictions, so the
    candidates' scores are placed on its levels before the distance: with the demo's cuts a
    verbosity prediction of 2.4 is level 1 and 4.2 is level 4, whatever their distance to 4."""
    scale = LevelScale({"verbosity": [2.05, 2.63, 3.42, 4.03], "complexity": [1.49, 1.88, 2.16, 2.45]})
    row = {"target_id": 0, "target_verbosity": 4, "target_complexity": 0, "candidate": 0}
    long_simple = scored_row(
        {**row, "apm_verbosity": 4.2, "apm_complexity": 1.3}, ["verbosity", "complexity"], scale
    )
    assert (long_simple["level_verbosity"], long_simple["level_complexity"]) == (4.0, 0.0)
    assert long_simple["distance"] == 0.0  # on the APM's own scale: |4.2-4|, |1.3-0| = 1.32
    short = scored_row(
        {**row, "candidate": 1, "apm_verbosity": 3.9, "apm_complexity": 0.4},
        ["verbosity", "complexity"],
        scale,
    )
    assert (short["level_verbosity"], short["level_complexity"]) == (3.0, 0.0) and short["distance"] == 1.0
    # On the APM's scale the second would win (3.9, 0.4 is nearer 4, 0 than 4.2, 1.3); on levels, the first.
    assert [
        r["candidate"]
        for r in choose([long_simple, short], ["verbosity", "complexity"], "closest", "quality")
    ] == [0]
    gaps = mean_gaps([long_simple, short], ["verbosity", "complexity"])
    assert gaps["per_attribute"] == {"verbosity": 0.5, "complexity": 0.0}
    # Without a scale (a model trained on human or rounded APM labels) the scores are the levels.
    own = scored_row({**row, "apm_verbosity": 3.9, "apm_complexity": 0.4}, ["verbosity", "complexity"])
    assert own["level_verbosity"] == 3.9 and own["distance"] == pytest.approx(math.hypot(0.1, 0.4), abs=1e-6)


def test_a_models_scale_is_read_from_its_levels_file_and_levels_ranked_per_prompt_are_refused(tmp_path):
    from ray_jobs.bootstrap import level_scale

    assert LevelScale.read(tmp_path) == LevelScale()  # no file: trained on human or rounded APM labels
    levels = tmp_path / LEVELS_FILE
    levels.write_text(json.dumps({"scope": "all", "cuts": {"verbosity": [2.0, 2.6, 3.4, 4.0]}}))
    assert level_scale(tmp_path).place("verbosity", 2.7) == 2.0
    levels.write_text(json.dumps({"scope": "all", "cuts": {"verbosity": [2.0, 3.4, 2.6, 4.0]}}))
    with pytest.raises(SourceError, match=f"{LEVELS_FILE}: cuts.verbosity: .* 4 ascending cut points"):
        LevelScale.read(tmp_path)
    levels.write_text(json.dumps({"scope": "prompt", "cuts": None}))
    assert LevelScale.read(tmp_path) is None
    with pytest.raises(ConfigError, match="levels ranked within each prompt .* quantile_scope: all"):
        level_scale(tmp_path)


def test_a_bootstrap_out_of_other_settings_is_refused_before_any_work(tmp_path):
    from helpsteer_core.outputs import mark_output
    from ray_jobs.bootstrap import BootstrapConfig, run

    out = tmp_path / "bootstrapped"
    out.mkdir()
    mark_output(out, "bootstrap")
    (out / "config.yaml").write_text("questions: 7\n")  # an earlier run's settings
    config = BootstrapConfig(generator=str(tmp_path / "sft"), apm=str(tmp_path / "apm"), out=str(out))
    with pytest.raises(ConfigError, match="holds a bootstrap run of other settings"):
        run(config)
    assert (out / "config.yaml").read_text() == "questions: 7\n"  # nothing was replaced

    user = tmp_path / "mine"  # a folder the stage did not write is refused, and left alone
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="was not written by the bootstrap stage"):
        run(config.model_copy(update={"out": str(user)}))
    assert (user / "notes.txt").read_text() == "keep"
