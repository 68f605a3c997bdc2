"""MT-Bench single-answer grading, with FastChat's rules: which judge prompt a question gets, how
the prompt is filled, how the judge's rating is read, what a judgment record holds, and the score
table. The HTTP side (the judge endpoint, retries, resume) is `ray_jobs.judge`.

The rules follow lm-sys/FastChat `fastchat/llm_judge` (common.py `run_judge_single` and
`play_a_match_single`, gen_judgment.py `make_judge_single`, show_result.py
`display_result_single`), so FastChat's `show_result.py` reads what we write:

- math, reasoning and coding questions are judged against GPT-4's reference answers
  (`single-math-v1`), the others without (`single-v1`); turn 2 is judged with the whole
  conversation (`single-v1-multi-turn`, `single-math-v1-multi-turn`), only for two-turn questions;
- the rating is the first `[[N]]` in the judge's reply, else the first `[N]`, else -1;
- scores of -1 are left out of every mean; the MT-Bench score is the mean over both turns.

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpsteer_core.readers import SourceError

NEED_REFERENCE = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS
# (judged against a reference, multi-turn) -> the judge prompt's name in judge_prompts.jsonl
PROMPT_NAMES = {
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
ERROR_SCORE = -1  # FastChat's rating when the reply holds none; show_result.py drops these
RECORD_FIELDS = ("question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def _read_jsonl(source: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every non-empty line; a missing file or a bad line names itself."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no {what} there")
    rows = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{source}:{number}: not JSON ({exc.msg}); expected {what}") from None
        if not isinstance(row, dict):
            raise SourceError(f"{source}:{number}: expected a JSON object ({what})")
        rows.append((number, row))
    return rows


def _turns(value: Any) -> list[str] | None:
    """`value` when it is a non-empty list of strings, else None."""
    ok = isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value)
    return value if ok else None


def read_questions(source: Path) -> list[dict[str, Any]]:
    """FastChat's question.jsonl: one {"question_id", "category", "turns": [str, ...]} per line."""
    questions = []
    for number, question in _read_jsonl(source, "MT-Bench questions (FastChat's question.jsonl)"):
        turns = _turns(question.get("turns"))
        if "question_id" not in question or turns is None or not all(turns):
            raise SourceError(
                f"{source}:{number}: needs question_id and turns (a list of non-empty strings), "
                "as in FastChat's question.jsonl"
            )
        questions.append(question)
    return questions


def per_category(questions: list[dict[str, Any]], count: int | None) -> list[dict[str, Any]]:
    """The first `count` questions of each category, in file order (None: every question). With
    FastChat's file the subset keeps every kind of grading: math, reasoning and coding are judged
    against reference answers, the other five without."""
    if count is None:
        return questions
    seen: dict[Any, int] = {}
    kept = []
    for question in questions:
        category = question.get("category")
        if seen.get(category, 0) < count:
            seen[category] = seen.get(category, 0) + 1
            kept.append(question)
    return kept


def read_answers(source: Path) -> dict[Any, list[str]]:
    """question_id -> the answer's turns, from a FastChat answer file (model_answer/<model>.jsonl
    or reference_answer/gpt-4.jsonl): {"question_id", "choices": [{"turns": [str, ...]}], ...}."""
    answers: dict[Any, list[str]] = {}
    for number, row in _read_jsonl(source, "FastChat answers"):
        choices = row.get("choices")
        if "question_id" not in row or not isinstance(choices, list) or not choices:
            raise SourceError(f"{source}:{number}: needs question_id and choices, as FastChat's answers")
        turns = _turns(choices[0].get("turns")) if isinstance(choices[0], dict) else None
        if turns is None:
            raise SourceError(f"{source}:{number}: choices[0].turns: expected a list of strings")
        answers[row["question_id"]] = list(turns)
    return answers


def read_judge_prompts(source: Path) -> dict[str, dict[str, Any]]:
    """FastChat's judge_prompts.jsonl by name; the four single-grading prompts must be there."""
    prompts = {str(row.get("name")): row for _, row in _read_jsonl(source, "FastChat judge prompts")}
    for name in PROMPT_NAMES.values():
        prompt = prompts.get(name)
        if prompt is None:
            raise SourceError(f"{source}: no judge prompt named {name!r} (FastChat's judge_prompts.jsonl)")
        if prompt.get("output_format") != "[[rating]]" or not {"system_prompt", "prompt_template"} <= set(
            prompt
        ):
            raise SourceError(
                f"{source}: {name}: needs system_prompt, prompt_template and output_format '[[rating]]'"
            )
    return prompts


@dataclass(frozen=True)
class Match:
    """One judge request: a model's answer to a question, at one turn, with its filled prompt."""

    question_id: Any
    category: str
    model: str
    judge: tuple[str, str]  # (judge model, judge prompt name), FastChat's `judge` field
    system_prompt: str
    user_prompt: str
    turn: int  # 1: the first answer alone; 2: the whole conversation, judged on its second answer

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        """What a judgment record answers; a resumed run skips matches whose key is recorded."""
        return record_key(
            {"judge": self.judge, "question_id": self.question_id, "model": self.model, "turn": self.turn}
        )

    def messages(self) -> list[dict[str, str]]:
        """The chat messages FastChat sends an OpenAI judge: the prompt's system text, then the
        filled template as the user message."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_prompt},
        ]


def record_key(record: dict[str, Any]) -> tuple[str, str, str, str, int]:
    judge_model, prompt_name = record["judge"]
    return judge_model, prompt_name, json.dumps(record["question_id"]), record["model"], int(record["turn"])


def fill_prompt(
    template: str, questions: list[str], answers: list[str], reference: list[str] | None, multi_turn: bool
) -> str:
    """The judge's user message: FastChat's placeholders filled with `str.format` (braces in the
    answers are data, never placeholders)."""
    fields = {}
    if reference is not None:  # FastChat passes both reference turns to every reference prompt
        fields = {"ref_answer_1": reference[0], "ref_answer_2": reference[1] if len(reference) > 1 else ""}
    if multi_turn:
        fields |= {
            "question_1": questions[0],
            "question_2": questions[1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
    else:
        fields |= {"question": questions[0], "answer": answers[0]}
    return template.format(**fields)


def plan_matches(
    questions: list[dict[str, Any]],
    answers: dict[str, dict[Any, list[str]]],
    prompts: dict[str, dict[str, Any]],
    references: dict[Any, list[str]],
    judge_model: str,
) -> tuple[list[Match], dict[str, list[Any]]]:
    """Every judge request for `answers` (model -> question_id -> turns), in FastChat's order:
    turn 1 without, then with references, then turn 2 likewise. Also returns, per model, the
    questions it has no answer to (judged: none; the caller reports them)."""
    by_id = {q["question_id"]: q for q in questions}
    for model, per in answers.items():
        unknown = [qid for qid in per if qid not in by_id]
        if unknown:
            raise SourceError(f"answers of {model}: question ids {unknown} are not in the question file")
    missing = {
        m: [q["question_id"] for q in questions if q["question_id"] not in per] for m, per in answers.items()
    }
    matches = []
    for multi_turn in (False, True):
        for needs_reference in (False, True):
            name = PROMPT_NAMES[(needs_reference, multi_turn)]
            prompt = prompts[name]
            for question in questions:
                qid, category = question["question_id"], question.get("category", "")
                if (category in NEED_REFERENCE) != needs_reference or (
                    multi_turn and len(question["turns"]) != 2
                ):
                    continue
                reference = references.get(qid) if needs_reference else None
                if needs_reference and reference is None:
                    raise SourceError(
                        f"question {qid} ({category}): no reference answer in the reference file"
                    )
                for model, per in answers.items():
                    if qid not in per:
                        continue
                    if len(per[qid]) < len(question["turns"]):
                        raise SourceError(
                            f"answers of {model}: question {qid} has {len(question['turns'])} turns, "
                            f"the answer {len(per[qid])}"
                        )
                    user = fill_prompt(
                        prompt["prompt_template"], question["turns"], per[qid], reference, multi_turn
                    )
                    matches.append(
                        Match(
                            qid,
                            category,
                            model,
                            (judge_model, name),
                            prompt["system_prompt"],
                            user,
                            1 + multi_turn,
                        )
                    )
    return matches, missing


def parse_rating(judgment: str) -> int | float:
    """FastChat's rating: the first `[[N]]`, else the first `[N]`, else -1 (N an integer or a
    decimal, as Python reads the literal: "8" -> 8, "7.5" -> 7.5)."""
    found = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if found is None:
        return ERROR_SCORE
    text = found.group(1)
    return int(text) if text.isdigit() else float(text)


def judgment_record(match: Match, judgment: str, tstamp: float | None = None) -> dict[str, Any]:
    """One line of `model_judgment/<judge>_single.jsonl`, with FastChat's fields in its order."""
    return {
        "question_id": match.question_id,
        "model": match.model,
        "judge": list(match.judge),
        "user_prompt": match.user_prompt,
        "judgment": judgment,
        "score": parse_rating(judgment),
        "turn": match.turn,
        "tstamp": time.time() if tstamp is None else tstamp,
    }


def _mean(scores: list[float]) -> float | None:
    return round(statistics.fmean(scores), 4) if scores else None


def summarize(records: list[dict[str, Any]], questions: list[dict[str, Any]]) -> dict[str, Any]:
    """model -> turn means, the MT-Bench score (both turns), category means and counts, as
    show_result.py computes them: records scored -1 are counted but left out of the means."""
    category = {q["question_id"]: q.get("category", "") for q in questions}
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        rated = [r for r in mine if r["score"] != ERROR_SCORE]
        judged = {category[r["question_id"]] for r in rated}
        categories = [c for c in dict.fromkeys(category.values()) if c in judged]  # the question file's order
        summary[model] = {
            "score": _mean([r["score"] for r in rated]),
            "turn_1": _mean([r["score"] for r in rated if r["turn"] == 1]),
            "turn_2": _mean([r["score"] for r in rated if r["turn"] == 2]),
            "categories": {
                c: _mean([r["score"] for r in rated if category[r["question_id"]] == c]) for c in categories
            },
            "judgments": len(mine),
            "unrated": len(mine) - len(rated),
            "questions": len({r["question_id"] for r in mine}),
        }
    return summary


def render_scores(summary: dict[str, Any], judge: str) -> str:
    """A markdown table: one row per model, the MT-Bench score first, then per turn and category."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    categories = list(dict.fromkeys(c for s in summary.values() for c in s["categories"]))
    head = ["model", "MT-Bench", "turn 1", "turn 2", *categories, "judgments", "unrated (-1)"]
    lines = [
        f"# MT-Bench, single-answer grading by {judge}",
        "",
        "Means of the judge's 1-10 ratings (FastChat's rules; replies without a rating score -1 and "
        "are left out of the means).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for model, s in summary.items():
        row = [model, cell(s["score"]), cell(s["turn_1"]), cell(s["turn_2"])]
        row += [cell(s["categories"].get(c)) for c in categories]
        lines.append("| " + " | ".join(row + [str(s["judgments"]), str(s["unrated"])]) + " |")
    return "\n".join(lines) + "\n"
