"""Real-style prompts from files, for evaluation beyond the synthetic validation split.

Three formats, chosen by the file's suffix:

- `.jsonl` with a `prompt` string per row (HelpSteer2 rows; a multi-turn prompt is kept as its raw
  string with `<extra_id_1>` separators, and must parse with `conversation.parse_prompt_turns`),
- `.jsonl` with a `turns` list of strings per row (FastChat MT-Bench `question.jsonl`; the FIRST
  turn is the prompt),
- `.txt`, one prompt per non-empty line.

A file gives its distinct prompts in file order; `real_prompts` interleaves several files round
robin, so the first N prompts mix the sources. Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from helpsteer_core.conversation import ConversationFormatError, parse_prompt_turns
from helpsteer_core.readers import SourceError

SUFFIXES = (".jsonl", ".txt")
_ROW_RULE = (
    "needs a non-empty `prompt` string or a `turns` list of strings "
    "(HelpSteer2 rows or FastChat question.jsonl)"
)


def _row_prompt(source: Path, number: int, line: str) -> str:
    """The prompt of one `.jsonl` line; a bad line raises naming file, line and field."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{source}:{number}: not JSON ({exc.msg}); {_ROW_RULE}") from None
    if not isinstance(row, dict) or ("prompt" not in row and "turns" not in row):
        raise SourceError(f"{source}:{number}: {_ROW_RULE}")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise SourceError(f"{source}:{number}: field `prompt`: {_ROW_RULE}")
        try:
            parse_prompt_turns(prompt)  # evaluation parses it again; a bad one fails here, named
        except ConversationFormatError as exc:
            raise SourceError(f"{source}:{number}: field `prompt`: {exc}") from None
        return prompt
    turns = row["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise SourceError(f"{source}:{number}: field `turns`: {_ROW_RULE}")
    return str(turns[0])


def read_prompt_file(path: str | Path) -> list[str]:
    """The distinct prompts of one file, in file order (formats in the module docstring)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no prompt file there")
    if source.suffix not in SUFFIXES:
        raise SourceError(
            f"{source}: unknown prompt file type {source.suffix!r}; allowed: {', '.join(SUFFIXES)}"
        )
    prompts: dict[str, None] = {}  # an ordered set
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        prompt = line.strip() if source.suffix == ".txt" else _row_prompt(source, number, line)
        prompts.setdefault(prompt, None)
    if not prompts:
        raise SourceError(f"{source}: no prompts")
    return list(prompts)


def real_prompts(files: Sequence[str | Path], count: int) -> list[str]:
    """The first `count` distinct prompts of `files`, taken round robin: file 1's first, file 2's
    first, ..., file 1's second, ...; a prompt already taken from an earlier file is skipped."""
    per_file = [read_prompt_file(f) for f in files]
    taken: dict[str, None] = {}
    for index in range(max((len(p) for p in per_file), default=0)):
        for prompts in per_file:
            if index < len(prompts):
                taken.setdefault(prompts[index], None)
    if len(taken) < count:
        found = ", ".join(f"{f} ({len(p)})" for f, p in zip(files, per_file, strict=True)) or "no files"
        raise SourceError(
            f"real prompts: {len(taken)} distinct prompts in {found}, fewer than the {count} asked for"
        )
    return list(taken)[:count]


__all__ = ["SUFFIXES", "read_prompt_file", "real_prompts"]
