"""Typed, frozen configs read from YAML, with errors that name the file, line and key.

Every stage has one pydantic model (frozen, unknown keys forbidden). `load_config` reads a YAML
file onto it, applies `dotted.key=value` overrides from the command line, and turns validation
errors into one message per problem: `configs/x.yaml:12: filters.max_tokns: unknown key; allowed:
...`. `dump_config` writes the resolved config that is saved beside every output.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)
HOME_ENV = "HELPSTEER_HOME"


class StrictModel(BaseModel):
    """Base of every config: immutable, and a misspelt key is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ConfigError(ValueError):
    """A config file or override that does not fit its model."""


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """An absolute path. Relative paths are taken from $HELPSTEER_HOME when set, else the cwd.

    Ray workers run in other directories, so every path a stage hands to Ray must be absolute;
    under `ray job submit` the cwd is a temporary copy of the working dir, which is why
    HELPSTEER_HOME exists.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = Path(os.environ.get(HOME_ENV) or os.getcwd())
    return (base / p).resolve()


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by its dotted path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = prefix + (str(key.value),)
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def merge_sections(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied: nested mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at `loc`, for 'allowed:' in error messages."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        current = next(
            (a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")),
            annotation,
        )
    return sorted(getattr(current, "model_fields", {}))


def validate_config(
    model: type[T],
    data: dict[str, Any],
    where: str,
    text: str | None = None,
    overrides: Sequence[str] = (),
) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text) if text else {}
        messages = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"])
            dotted = ".".join(loc) or "(top level)"
            overridden = [o for o in overrides if o.partition("=")[0].strip() == dotted]
            line = lines.get(loc) or lines.get(loc[:-1])
            if overridden:
                place = f"override {overridden[-1]!r}"
            else:
                place = f"{where}:{line}" if line else where
            if error["type"] == "extra_forbidden":
                allowed = ", ".join(_allowed_keys(model, error["loc"]))
                messages.append(f"{place}: {dotted}: unknown key; allowed: {allowed}")
            else:
                messages.append(f"{place}: {dotted}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("invalid config\n  " + "\n  ".join(messages)) from None


def load_config(
    model: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> T:
    """Read `path` (optional) onto `model`, then apply `overrides` (`a.b=value`).

    A file may start from another one: `extends: other.yaml` (relative to the file) reads that
    file first and applies this one's keys over it, sections merged key by key (`merge_sections`).
    """
    data: dict[str, Any] = copy.deepcopy(defaults or {})
    text = None
    where = "overrides"
    if path is not None:
        file = resolve_path(path)
        loaded, text, chain = _read_extended(file.resolve(), str(path), ())
        where = str(path) + "".join(f" (extends {name})" for name in chain)
        data.update(loaded)
    data = apply_overrides(data, overrides)
    return validate_config(model, data, where, text, overrides)


EXTENDS = "extends"


def _read_extended(file: Path, where: str, seen: tuple[Path, ...]) -> tuple[dict[str, Any], str, list[str]]:
    """The mapping in `file` over the one it extends, its own text, and the files it extends."""
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    if file in seen:
        raise ConfigError(f"{where}: extends itself through {' -> '.join(str(f) for f in (*seen, file))}")
    text = file.read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, found {type(loaded).__name__}")
    if EXTENDS not in loaded:
        return loaded, text, []
    below = loaded.pop(EXTENDS)
    if not isinstance(below, str) or not below:
        raise ConfigError(f"{where}: {EXTENDS}: expected the path of another config file, got {below!r}")
    base, _, chain = _read_extended((file.parent / below).resolve(), below, (*seen, file))
    return merge_sections(base, loaded), text, [below, *chain]


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
