"""Self-written training answers: SteerLM's bootstrapping shape for the embedded default.

The untuned generator answers everyday questions several times each, once per *style*: an
instruction added to the question that asks for a length or a register ("Answer in one short
sentence.", "Explain it to a seven-year-old."), for some registers shown by an example exchange
first (`EXAMPLES`). The APM then labels every answer (relabel stage)
and AC-SFT learns to reproduce each answer from the *plain* question plus the APM's attributes, so
the attributes, not the instruction, come to carry the style. The answers are the model's own, so
fine-tuning on them teaches the knobs without replacing how it answers.

The questions come from a bank the package ships (`helpsteer_core/data/questions.json`: forms x
subjects), never from an evaluation prompt file. `ray_jobs.generate_answers` runs the generation
on a Ray Data actor pool.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from helpsteer_core.config import ConfigError

# Style name -> the instruction appended to the question ("" asks nothing). Lengths and registers
# spread verbosity and complexity; SmolLM2-135M-Instruct follows these (shared/DESIGN.md: "one
# short sentence" median 20 words, no instruction 134, "several paragraphs" 164). The registers'
# Flesch-Kincaid grades, 9 questions x 10 candidate instructions at T 0.7 (docs/results.md):
# simple 5.4, high_school 7.9, simple_terms 10.8, plain 11.6, expert 13.7.
STYLES: dict[str, str] = {
    "one_sentence": "Answer in one short sentence.",
    "brief": "Answer briefly, in two or three sentences.",
    "plain": "",
    "detailed": "Answer in detail, in several paragraphs.",  # mostly runs past 160-256 new tokens
    "simple": "Explain it simply, as you would to a seven-year-old.",
    "high_school": "Explain it to a high-school student.",
    "simple_terms": "Explain it in simple terms.",
    "expert": "Answer as a specialist would, with precise technical terms.",
    # Registers shown by example (EXAMPLES): the instruction and an answer written in that register
    # to another question come first, as an earlier exchange of the conversation.
    "child_example": "Explain it to a small child.",
    "simple_example": "Explain it simply.",
    "technical_example": "Answer in technical detail.",
    "specialist_example": "Answer as a specialist would, with precise technical terminology.",
}

# Instructions alone give SmolLM2-135M two registers (a child's, FK ~6, and one FK 11-14 for every
# other instruction): the levels between had no answers to learn from. Shown one answer in the
# register first, it writes them in order. 12 bank questions, T 0.7 (docs/results.md): FK grade
# 4.8, 6.9, 16.1, 18.5 for these four (10.0 for the plain question shown an FK-11 answer); ranked
# within each question against the register asked, Spearman 0.84 (the same instructions alone: 0.50).
EXAMPLE_QUESTION = "Why do leaves change color in the fall?"
EXAMPLES: dict[str, str] = {
    "child_example": (
        "Leaves are green in summer. In fall, days get short and cold. The tree stops making the "
        "green part. Then we can see the yellow and orange that hid under the green. Some leaves "
        "turn red. Then they dry up and fall down."
    ),
    "simple_example": (
        "In summer, leaves are full of a green substance that helps the tree make food from "
        "sunlight. When autumn comes, the days get shorter, so the tree stops making it. As the "
        "green fades, yellow and orange colors show through. Some trees also make red colors from "
        "the sugar left in their leaves."
    ),
    "technical_example": (
        "The seasonal coloration of deciduous foliage results from the degradation of chlorophyll, "
        "which is no longer synthesized once shortening photoperiods and declining temperatures "
        "trigger senescence. The persistent carotenoids, previously masked, become visible, whereas "
        "anthocyanins are synthesized de novo from accumulated carbohydrates, particularly under "
        "conditions of bright light and cool nights."
    ),
    "specialist_example": (
        "Autumnal leaf senescence is a genetically programmed, photoperiodically regulated process "
        "in which chloroplast dismantling and chlorophyll catabolism via the pheophorbide a "
        "oxygenase pathway facilitate nitrogen remobilization, thereby unmasking constitutive "
        "carotenoids and xanthophylls, while phenylpropanoid-derived anthocyanin biosynthesis, "
        "upregulated by carbohydrate accumulation and photo-oxidative stress, confers "
        "photoprotection during nutrient resorption."
    ),
}


@dataclass(frozen=True)
class AnswerRequest:
    """One answer to write: the question as trained on, and the text the generator is shown."""

    prompt: str  # the plain question (the training prompt)
    style: str
    shown: str  # the question with the style's instruction, what the untuned generator answers

    def turns(self) -> list[dict[str, str]]:
        """The conversation the untuned generator continues: the style's example exchange, if it
        has one (the same instruction on `EXAMPLE_QUESTION`, answered in the register), then `shown`."""
        turns = [{"role": "User", "text": self.shown}]
        example = EXAMPLES.get(self.style)
        if example is None:
            return turns
        asked = f"{EXAMPLE_QUESTION} {STYLES[self.style]}".strip()
        return [{"role": "User", "text": asked}, {"role": "Assistant", "text": example}, *turns]


def question_bank() -> list[str]:
    """Every question of the shipped bank, in a fixed order, without duplicates."""
    bank = json.loads(resources.files("helpsteer_core").joinpath("data/questions.json").read_text())
    questions = [form.format(s=s) for s in bank["concepts"] for form in bank["concept_forms"]]
    questions += [form.format(s=s) for s in bank["skills"] for form in bank["skill_forms"]]
    questions += [form.format(s=s) for s in bank["writing_subjects"] for form in bank["writing_forms"]]
    questions += [bank["comparison_form"].format(a=a, b=b) for a, b in bank["comparisons"]]
    return list(dict.fromkeys(questions))


def pick_questions(count: int, seed: int) -> list[str]:
    """`count` distinct questions of the bank, a seeded sample (raises when the bank is smaller)."""
    bank = question_bank()
    if not 1 <= count <= len(bank):
        raise ConfigError(f"questions: {count}; allowed: 1 to {len(bank)} (the size of the question bank)")
    return random.Random(seed).sample(bank, count)


def answer_requests(questions: Sequence[str], styles: Sequence[str]) -> list[AnswerRequest]:
    """One request per question and style, question-major."""
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ConfigError(f"styles: {list(styles)}; allowed: a non-empty list of {', '.join(STYLES)}")
    return [AnswerRequest(q, style, f"{q} {STYLES[style]}".strip()) for q in questions for style in styles]


# An answer whose word 4-grams repeat this much is a loop ("a candle, a candle, ..."), not an answer.
MAX_REPEATED_4GRAMS = 0.2
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def repeated_share(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams that repeat an earlier one (0 for fewer than n words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


# A full stop that ends no sentence: a list marker ("2. "), an abbreviation ("e.g. ", "Dr. ").
_NOT_AN_END = re.compile(r"(?:^|\s)(?:\d+|[A-Za-z]|e\.g|i\.e|etc|vs|Dr|Mr|Mrs|Ms|St|No)\.$", re.IGNORECASE)


def sentence_ends(text: str) -> list[int]:
    """The offsets just after each complete sentence of `text`: a `.`, `!` or `?` (with any closing
    quote or bracket) before whitespace or the end, except after a list number or an abbreviation."""
    return [
        m.end()
        for m in _SENTENCE_END.finditer(text)
        if m.group().startswith(("!", "?"))
        or not _NOT_AN_END.search(text[max(0, m.start() - 6) : m.start() + 1])
    ]


def cut_to_sentence(text: str) -> str:
    """`text` up to the end of its last complete sentence ("" when none ends)."""
    ends = sentence_ends(text)
    return text[: ends[-1]].rstrip() if ends else ""


def first_sentences(text: str, count: int) -> str | None:
    """The first `count` sentences of `text`, or None when it has no more than `count` (nothing to cut).

    A shorter version of an answer keeps its opening, which is where a model states the answer;
    training on it ends the turn there, so the attributes learn where to stop.
    """
    ends = sentence_ends(text)
    if len(ends) <= count or not text[ends[count - 1] :].strip():
        return None
    return text[: ends[count - 1]].rstrip()


@dataclass(frozen=True)
class Verdict:
    """What becomes of one written answer: the text trained on, or the reason it is not."""

    text: str
    cut: bool  # the answer ran out of new tokens and was cut back to its last full sentence
    reason: str | None  # None: kept


def judge_answer(text: str, finished: bool, max_new_tokens: int) -> Verdict:
    """Keep an answer, cut it back to a sentence end, or reject it with the reason.

    An answer that did not end within `max_new_tokens` is cut after its last complete sentence
    when that keeps at least half of it (training then ends it there with the end-of-turn
    marker); otherwise it would teach an answer with no end. A loop or an empty answer teaches
    nothing.
    """
    cut = False
    if not finished:
        kept = cut_to_sentence(text)
        if len(kept) < len(text) / 2:
            return Verdict(text, False, f"did not end within max_new_tokens={max_new_tokens}")
        text, cut = kept, True
    if not text.strip():
        return Verdict(text, cut, "empty answer")
    share = repeated_share(text)
    if share > MAX_REPEATED_4GRAMS:
        return Verdict(text, cut, f"repetitive: {share:.0%} of its word 4-grams repeat")
    return Verdict(text, cut, None)


def answer_row(request: AnswerRequest, verdict: Verdict, new_tokens: int, model: str) -> dict[str, Any]:
    """The output row of one written answer (the relabel stage adds the APM's attributes)."""
    return {
        "prompt": request.prompt,
        "response": verdict.text,
        "style": request.style,
        "instruction": STYLES[request.style],
        "example": EXAMPLES.get(request.style),  # the register's example answer shown first, if any
        "new_tokens": new_tokens,
        "cut_at_sentence": verdict.cut,
        "first_sentences": None,  # None: the whole answer; N: a shorter version (`shorter_rows`)
        "answered_by": model,
        "source": "self-answers",
    }


def shorter_rows(rows: Sequence[dict[str, Any]], counts: Sequence[int]) -> list[dict[str, Any]]:
    """For each kept answer and each N of `counts`, a version cut to its first N sentences when it
    has more than N (`first_sentences`); each records its N in `first_sentences`.

    The versions of one answer differ only in where the turn ends, so their verbosity labels are
    ordered by length with the content fixed: what AC-SFT needs to learn where to stop.
    """
    versions = []
    for row in rows:
        for count in sorted(set(counts)):
            text = first_sentences(row["response"], count)
            if text is not None:
                versions.append({**row, "response": text, "first_sentences": count})
    return versions
