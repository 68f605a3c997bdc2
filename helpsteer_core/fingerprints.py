"""Content fingerprints: what a cache key or a run identity says an input *is*, not where it lies.

A path names a place; the same path can hold other data tomorrow (a file edited in place, a
model retrained into the same folder). Keys and identities therefore hash file contents:

    file_digest(path)          # sha256 of the bytes
    folder_digest(folder)      # every file under it (names and contents), hidden files skipped
    source_fingerprint(source) # a local file or folder by content, `hf:` by datasets' fingerprint
    model_fingerprint(name)    # the same for a model, its weight digests cached
    settings_key(a, b, ...)    # a short stable hash of JSON-able parts
    result_settings(settings, speed_only)  # a config without the fields that only change speed

Hashing a 70B model's weights takes minutes, so a model file's digest is cached (`cached=True`,
`model_fingerprint`), keyed on its absolute path, size and modification time (nanoseconds), in
memory and in `HELPSTEER_CACHE` (default `~/.cache/helpsteer/digests.json`). Data files are
hashed every time: an edit in place can keep both size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from helpsteer_core.config import resolve_path

_MEMORY: dict[str, str] = {}
_CHUNK = 1 << 22  # 4 MiB reads


def code_version() -> str:
    """The installed package's version: part of every cache key (bump it when results change)."""
    try:
        return metadata.version("helpsteer-ray")
    except metadata.PackageNotFoundError:
        return "unknown"


def settings_key(*parts: Any) -> str:
    """A 10-hex-digit hash of `parts` as sorted JSON (the same parts give the same key)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _cache_file() -> Path:
    root = os.environ.get("HELPSTEER_CACHE") or Path.home() / ".cache" / "helpsteer"
    return Path(root) / "digests.json"


def _read_cache() -> dict[str, str]:
    try:
        found = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_cache(entries: dict[str, str]) -> None:
    """Best effort: a read-only home only costs a re-hash next time."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = _read_cache() | entries
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, path)
    except OSError:
        pass


def file_digest(path: Path | str, cached: bool = False) -> str:
    """sha256 (hex) of the file's bytes. `cached` (for model weights, which are large and only
    ever replaced whole) reuses a digest recorded for the same absolute path, size and mtime;
    data files are hashed every time, since an edit in place can keep both."""
    path = Path(path).resolve()
    stat = path.stat()
    entry = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if cached and entry in _MEMORY:
        return _MEMORY[entry]
    found = _read_cache().get(entry) if cached else None
    if found is None:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        found = digest.hexdigest()
        if cached:
            _write_cache({entry: found})
    if cached:
        _MEMORY[entry] = found
    return found


def folder_digest(folder: Path | str, pattern: str = "**/*", cached: bool = False) -> str:
    """sha256 (hex) over the relative names and contents of the files matching `pattern`.

    Names starting with "." (a stage's marker with its publish time, staging folders) are skipped:
    they say when and how, not what.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.glob(pattern) if p.is_file()):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_digest(file, cached)}\n".encode())
    return digest.hexdigest()


def path_fingerprint(path: Path | str, cached: bool = False) -> str:
    """A local file's or folder's content digest."""
    path = Path(path)
    return file_digest(path, cached) if path.is_file() else folder_digest(path, cached=cached)


def model_fingerprint(name: str) -> str:
    """A model (a folder, a Hub id, a packaged model) as `source_fingerprint` gives it, with the
    weight files' digests cached by size and mtime."""
    return source_fingerprint(name, cached=True)


def source_fingerprint(source: str, split: str = "train", cached: bool = False) -> str:
    """What a reader source holds: a local file or folder by content; `hf:ID` by the fingerprint
    `datasets` gives the split it resolves (it changes with the dataset's revision); anything else
    (a Hub model id, a packaged model) by its name and this package's version."""
    from helpsteer_core.readers import HF_PREFIX, SourceError

    if source.startswith(HF_PREFIX):
        import datasets

        try:
            loaded = datasets.load_dataset(source[len(HF_PREFIX) :], split=split)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; report them all alike
            raise SourceError(f"{source}: cannot load split {split!r}: {exc}") from exc
        return f"{source}[{split}]@{loaded._fingerprint}"
    local = resolve_path(source)
    if local.exists():
        return f"sha256:{path_fingerprint(local, cached)}"
    return f"{source}@{code_version()}"


def without_off(settings: dict[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` less the options that are at their `off` value: an option added later leaves
    the cache key and run identity of a run that does not use it as they were."""
    return {key: value for key, value in settings.items() if key not in off or value != off[key]}


def result_settings(settings: BaseModel, speed_only: Iterable[str]) -> dict[str, Any]:
    """`settings` as JSON without the dotted `speed_only` fields (those that change only how fast
    or where the work runs, never what it produces): what a cache key or run identity covers."""
    dump = settings.model_dump(mode="json")
    for dotted in speed_only:
        *parents, name = dotted.split(".")
        node: Any = dump
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return dict(dump)
