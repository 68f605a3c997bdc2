"""Typed configs from YAML: unknown keys and wrong types are errors naming the file, line, dotted key
and allowed keys; overrides are typed by YAML; relative paths follow HELPSTEER_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from helpsteer_core.config import (
    HOME_ENV,
    ConfigError,
    StrictModel,
    dump_config,
    load_config,
    parse_override,
    resolve_path,
)


class Optimizer(StrictModel):
    lr: float = 1e-4
    steps: int = 10
    name: str = "adamw"


class Data(StrictModel):
    source: str = "data/train.jsonl"
    max_rows: int | None = None


class Stage(StrictModel):
    data: Data = Data()
    optimizer: Optimizer = Optimizer()
    eval: Optimizer | None = None  # an optional nested section
    seed: int = 0


def write(tmp_path: Path, text: str, name: str = "stage.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_maps_onto_the_model(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 3\noptimizer:\n  lr: 0.5\n  steps: 7\ndata:\n  max_rows: 100\n")
    cfg = load_config(Stage, path)
    assert cfg == Stage(seed=3, optimizer=Optimizer(lr=0.5, steps=7), data=Data(max_rows=100))


def test_a_file_extends_another_section_by_section(tmp_path: Path) -> None:
    write(tmp_path, "seed: 3\noptimizer:\n  lr: 0.5\n  steps: 7\ndata:\n  max_rows: 100\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\noptimizer:\n  lr: 0.1\ndata:\n  max_rows: null\n")
    cfg = load_config(Stage, child, ["seed=4"])
    assert cfg == Stage(seed=4, optimizer=Optimizer(lr=0.1, steps=7), data=Data(max_rows=None))
    # A problem names the file, and the file it extends.
    bad = write(tmp_path, "extends: base.yaml\noptimizer:\n  stpes: 5\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml \(extends base.yaml\):3: optimizer.stpes: unknown key"):
        load_config(Stage, bad)


def test_extends_refuses_a_cycle_a_missing_file_and_a_non_path(tmp_path: Path) -> None:
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="extends itself through"):
        load_config(Stage, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_config(Stage, write(tmp_path, "extends: nowhere.yaml\n", "c.yaml"))
    with pytest.raises(ConfigError, match="extends: expected the path of another config file, got 3"):
        load_config(Stage, write(tmp_path, "extends: 3\n", "d.yaml"))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(Stage, write(tmp_path, "# nothing set\n")) == Stage()


def test_unknown_nested_key_names_file_line_dotted_key_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "# run: helpsteer stage\nseed: 1\noptimizer:\n  lr: 0.1\n  stpes: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, path)
    assert str(err.value) == (
        f"invalid config\n  {path}:5: optimizer.stpes: unknown key; allowed: lr, name, steps"
    )


def test_unknown_top_level_key_lists_top_level_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nsed: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, path)
    assert f"{path}:2: sed: unknown key; allowed: data, eval, optimizer, seed" in str(err.value)


def test_unknown_key_in_optional_section_lists_its_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "eval:\n  steps: 2\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, path)
    assert f"{path}:3: eval.lrr: unknown key; allowed: lr, name, steps" in str(err.value)


def test_wrong_type_names_line_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  source: x.jsonl\n  max_rows: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, path)
    message = str(err.value)
    assert f"{path}:3: data.max_rows: " in message
    assert "valid integer" in message
    assert "(got 'lots')" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: x\noptimizer:\n  steps: 1.5\n  bogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, path)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config"
    assert len(lines) == 4
    assert any(line.startswith(f"  {path}:1: seed: ") for line in lines)
    assert any(line.startswith(f"  {path}:3: optimizer.steps: ") for line in lines)
    assert f"  {path}:4: optimizer.bogus: unknown key; allowed: lr, name, steps" in lines


def test_overrides_are_applied_and_typed_by_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "optimizer:\n  steps: 5\n")
    cfg = load_config(
        Stage,
        path,
        overrides=["optimizer.steps=3", "optimizer.lr=2.5e-3", "data.max_rows=null", "seed= 9 "],
    )
    assert cfg.optimizer.steps == 3 and type(cfg.optimizer.steps) is int
    assert cfg.optimizer.lr == 0.0025
    assert cfg.data.max_rows is None
    assert cfg.seed == 9


def test_override_creates_a_missing_section() -> None:
    cfg = load_config(Stage, overrides=["eval.steps=4"])
    assert cfg.eval == Optimizer(steps=4)


def test_override_value_is_yaml_typed_so_quotes_keep_strings() -> None:
    assert load_config(Stage, overrides=["optimizer.name='true'"]).optimizer.name == "true"
    with pytest.raises(
        ConfigError, match=r"override 'optimizer.name=true': optimizer.name: .*valid string \(got True\)"
    ):
        load_config(Stage, overrides=["optimizer.name=true"])


@pytest.mark.parametrize("text", ["optimizer.steps", "=3", " =3"])
def test_override_without_key_or_equals_is_an_error(text: str) -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(Stage, overrides=[text])


def test_override_into_a_scalar_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\n")
    with pytest.raises(ConfigError, match=r"override 'seed.x=1': 'seed' is not a section"):
        load_config(Stage, path, overrides=["seed.x=1"])


def test_override_of_an_unknown_key_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"override 'optimizer.lrr=1': optimizer.lrr: unknown key; allowed: lr, name, steps"
    ):
        load_config(Stage, overrides=["optimizer.lrr=1"])


def test_parse_override_splits_dotted_key() -> None:
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x=a=b") == (["x"], "a=b")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Stage, tmp_path / "nope.yaml")
    assert str(err.value) == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_bad_yaml_and_non_mapping_name_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "seed: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(Stage, bad)
    listed = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match=f"{listed}: expected a mapping of keys, found list"):
        load_config(Stage, listed)


def test_configs_are_frozen() -> None:
    cfg = load_config(Stage)
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


def test_dump_config_loads_back_to_the_same_config(tmp_path: Path) -> None:
    cfg = load_config(Stage, overrides=["eval.lr=0.5", "data.max_rows=7", "seed=2"])
    text = dump_config(cfg)
    assert text.startswith("data:\n  source: data/train.jsonl\n  max_rows: 7\n")
    assert load_config(Stage, write(tmp_path, text)) == cfg


def test_overrides_do_not_change_the_callers_defaults() -> None:
    defaults = {"optimizer": {"steps": 1}}
    assert load_config(Stage, overrides=["optimizer.steps=3"], defaults=defaults).optimizer.steps == 3
    assert defaults == {"optimizer": {"steps": 1}}


# --- resolve_path ---------------------------------------------------------------------------------


def test_resolve_path_uses_helpsteer_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_path("configs/x.yaml") == (tmp_path / "home" / "configs" / "x.yaml").resolve()
    assert resolve_path("/abs/x.yaml") == Path("/abs/x.yaml")


def test_resolve_path_falls_back_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("x.yaml") == tmp_path.resolve() / "x.yaml"
    monkeypatch.setenv(HOME_ENV, "")  # empty means unset
    assert resolve_path("x.yaml") == tmp_path.resolve() / "x.yaml"


def test_resolve_path_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("~/x.yaml") == tmp_path / "x.yaml"


def test_load_config_reads_relative_paths_from_helpsteer_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "seed: 42\n", "stage.yaml")
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.chdir("/")
    assert load_config(Stage, "stage.yaml").seed == 42


SHIPPED = {
    "filter_data.yaml": ("ray_jobs.filter_data", "FilterStageConfig"),
    "train_apm.yaml": ("ray_jobs.train_apm", "TrainAPMConfig"),
    "generate_answers.yaml": ("ray_jobs.generate_answers", "AnswersConfig"),
    "relabel.yaml": ("ray_jobs.relabel", "RelabelConfig"),
    "train_sft.yaml": ("ray_jobs.train_sft", "TrainSFTConfig"),
    "evaluate.yaml": ("ray_jobs.evaluate", "EvaluateConfig"),
    "judge.yaml": ("ray_jobs.judge", "JudgeConfig"),
    "export_data.yaml": ("ray_jobs.export_data", "ExportConfig"),
    "local.yaml": ("ray_jobs.pipeline", "PipelineConfig"),
    "local-full.yaml": ("ray_jobs.pipeline", "PipelineConfig"),
    "llama2-70b.yaml": ("ray_jobs.pipeline", "PipelineConfig"),
    "llama2-70b-lora.yaml": ("ray_jobs.pipeline", "PipelineConfig"),
    "helpsteer2.yaml": ("ray_jobs.pipeline", "PipelineConfig"),
    "helpsteer-paper.yaml": ("ray_jobs.pipeline", "PipelineConfig"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_loads_into_its_stage_and_names_its_command(name: str) -> None:
    import importlib

    repo = Path(__file__).resolve().parents[1]
    assert {p.name for p in (repo / "configs").glob("*.yaml")} == set(SHIPPED)
    module, cls = SHIPPED[name]
    path = repo / "configs" / name
    load_config(getattr(importlib.import_module(module), cls), path)
    assert path.read_text().startswith("# "), f"{name} must start with the command that runs it"
