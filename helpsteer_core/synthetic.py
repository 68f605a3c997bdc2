"""Deterministic synthetic HelpSteer-style data with planted, measurable attribute signals.

The full HelpSteer sets are not available offline, so this module is how the pipeline proves that
it learns: every attribute label is a documented function of the text (plus, for helpfulness,
of the other labels and seeded noise), so a model that reads prompt + response can recover it,
and a test can check that it did (a known-answer test). No label is ever written into the text
as a tag: the signals are sentence counts, vocabulary, sentence order, connectives and facts.

    rows = generate(2000, seed=1)                    # list of dicts, HelpSteer columns
    write_synthetic("runs/data/synthetic", 20000, seed=1)   # JSONL shards + manifest.json

A row is `{"id": "syn-s1-000123", "prompt", "response", "helpfulness", "correctness",
"coherence", "complexity", "verbosity", "source": "synthetic"}` with integer attributes in 0..4.
Rows are grouped by prompt: each prompt gets a number of responses drawn uniformly from
`responses_per_prompt` (the last prompt may get fewer so that exactly `rows` rows come out).
Prompt texts are unique and the responses to one prompt are distinct, so a (prompt, response)
pair never repeats and no de-duplication drops a synthetic row. Everything is drawn from one
`random.Random(seed)` (no `hash()` of strings, which is salted per process), so the same
arguments give the same rows in any process, and `generate(n, s)` is a prefix of `generate(m, s)`
for n < m.

Prompts
-------
Task types (equally likely): describe one entity, compare two entities of one kind, give facts
about three or four named entities of one kind, compute and explain a sum or a product of two
whole numbers (a repeated prompt text is redrawn within its task type; the mix stays even at
100,000 rows). Each
prompt carries exactly one length request, as a prefix ("In one sentence, ...") or a suffix
("... Explain in detail."); see `LENGTH_REQUESTS`. A fraction `multi_turn_fraction` of prompts
are multi-turn in HelpSteer2's format, `"{user 1}\\n<extra_id_1>Assistant\\n{assistant 1}
\\n<extra_id_1>User\\n{user 2}"`: the earlier exchange is a short question and a correct
two-fact answer; the task the response answers and its length request are in the last user turn.

The rules (the known answer)
----------------------------
A response is a list of sentences joined by single spaces, each ending in "." (no other full
stops: no abbreviations, no decimals), so `split_sentences` recovers them exactly. Every
sentence of a response is written at the response's complexity level. The *planned* response is
its facts in order (for arithmetic the worked steps, tens and ones first, ending with the
result) with elaboration sentences (topical, stating no fact) spread over the slots after the
first, which is always a fact; every planned sentence after the first opens with a connective
("Also," ... "Finally,"), see `MIDDLE_CONNECTIVES` and `LAST_CONNECTIVES`.

verbosity: the last user turn asks for a target number of sentences by its wording (key
    phrases, case-insensitive, `TARGET_KEYS`, read by `target_sentences`): "one sentence" /
    "single sentence" -> 1, "brief" -> 2, "short paragraph" / "few sentences" -> 3, "in detail" /
    "thorough" / "in depth" -> 5. With r = (sentences in the response) / target, the label is
    r < 0.45 -> 0, 0.45 <= r < 0.8 -> 1, 0.8 <= r <= 1.3 -> 2, 1.3 < r < 2 -> 3, r >= 2 -> 4
    (`verbosity_label`). So two sentences are verbosity 4 after "In one sentence" and 0 after
    "Explain in detail". Every sentence counts, the off-topic and contradicting ones included.
complexity: the level picks every piece of every sentence from banks indexed by level: the
    fact template (`FACT_CORES`: plain for levels 0-1, e.g. "the capital of France is Paris";
    fuller for 2; technical for 3-4, "the designated national capital of France is Paris"), the
    tail after a fact (`FACT_TAILS`: none at 0; a short plain tail at 1, ", as the books explain";
    one plain subordinate clause at 2; one technical clause at 3; two technical clauses at 4),
    the connectives ("Also" at 0-1, "Furthermore" at 3-4), the elaboration sentences
    (`ELAB_SUBJECTS`, `ELAB_VERBS`, `ELAB_CLAUSES`: "many people like to learn about France" at
    0 up to "contemporary epistemological investigations meticulously contextualise ..., although
    ..." at 4) and the off-topic sentences (`OFF_TOPIC`). Mean word length and mean words per
    sentence rise with the level.
coherence: 4 minus the number of disruptions (`coherence_label`), each distinct and visible:
    "shuffle": the planned sentences are permuted so that the opening fact is no longer first;
        connectives stay with their sentences, so "Finally, ..." can open the response;
    "no_connectives": every connective is dropped;
    "off_topic": a sentence about something unrelated (a bakery, a football match, ...; it
        names nothing from the fact base) is inserted at a random position after the first;
    "contradiction": the negation of a fact stated earlier ("The capital of France is not
        Paris.", the same template with "is" -> "is not" and the same value) is inserted at a
        random position after that fact.
    Inserted sentences take sentence slots, and shuffling or dropping connectives needs two
    planned sentences, so short responses allow fewer disruptions (one sentence: coherence 4).
correctness: a stated fact is a sentence that matches a fact template (optionally after a
    connective, optionally followed by a tail) and is not negated. It is correct when it agrees
    with the closed fact base in this module: 15 countries (capital, continent, currency, main
    language), 13 elements (symbol, atomic number, state at room temperature), 8 planets (order
    from the Sun, type, largest moon, year length in Earth days) and sums and products of whole
    numbers. A wrong fact is the right sentence with only the value changed: another entity's
    (different) value for the same property, or an off-by-k number for atomic numbers (k = 1..3),
    planet order (1..2 places) and arithmetic results (1, 2 or 10). Label =
    floor(4 * correct / stated + 0.5), i.e. rounded half up (`correctness_label`); every response
    states at least one fact. Negations (contradictions) are not stated facts: they count for
    coherence only. `parse_fact`, `fact_is_correct` and `correctness_from_text` apply the rule.
helpfulness: h = clip(floor(0.8 * correctness + 0.25 * coherence + 0.2 * (4 - 2 * |verbosity
    - 2|) - 0.85 + noise + 0.5), 0, 4), noise ~ Normal(0, 0.6) drawn per response
    (`helpfulness_label`, `HELPFULNESS_WEIGHTS`). corr(helpfulness, correctness) is about 0.85,
    as in HelpSteer. The clip applies to this computed value only.

Sampling, per response: the prompt's target is drawn once per prompt (`TARGET_WEIGHTS`: a
one-sentence request half as often as each other). Verbosity (`VERBOSITY_WEIGHTS` over the
levels the target allows) and coherence (uniform 0..4) are drawn together, and redrawn together
until some sentence count gives that verbosity and allows that many disruptions; the count is
uniform over those (1..10 sentences, at most 2 * target + 2 for verbosity 4, so responses stay
under about 250 words); the disruptions are uniform over the sets of the right size that fit.
Complexity is uniform over 0..4. Correctness is uniform over the levels some number of facts
(at most the free slots and the facts the task offers) can reach, then the number of facts and
which of them are wrong are uniform over the choices that give it; the other slots are
elaborations. Every attribute spans 0..4 (each value on about 7% or more of the rows);
helpfulness follows correctness, coherence and verbosity are mildly anti-correlated (about -0.3:
long answers have room for more disruptions), the other pairs are uncorrelated.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, product
from pathlib import Path
from typing import Any

from helpsteer_core.attributes import HELPSTEER
from helpsteer_core.config import ConfigError
from helpsteer_core.conversation import Turn, join_prompt_turns, parse_prompt_turns

GENERATOR_VERSION = 1
SOURCE = "synthetic"
MANIFEST = "manifest.json"
SHARD_GLOB = "synthetic-*.jsonl"

Row = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# The closed fact base.

# name, capital, continent, currency, main language
_COUNTRY_ROWS = (
    ("France", "Paris", "Europe", "euro", "French"),
    ("Germany", "Berlin", "Europe", "euro", "German"),
    ("Italy", "Rome", "Europe", "euro", "Italian"),
    ("Spain", "Madrid", "Europe", "euro", "Spanish"),
    ("Japan", "Tokyo", "Asia", "yen", "Japanese"),
    ("China", "Beijing", "Asia", "yuan", "Mandarin"),
    ("India", "New Delhi", "Asia", "rupee", "Hindi"),
    ("Egypt", "Cairo", "Africa", "Egyptian pound", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Kenyan shilling", "Swahili"),
    ("Brazil", "Brasilia", "South America", "real", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Argentine peso", "Spanish"),
    ("Peru", "Lima", "South America", "sol", "Spanish"),
    ("Canada", "Ottawa", "North America", "Canadian dollar", "English"),
    ("Mexico", "Mexico City", "North America", "Mexican peso", "Spanish"),
    ("Australia", "Canberra", "Oceania", "Australian dollar", "English"),
)
COUNTRIES: dict[str, dict[str, str]] = {
    name: {"capital": capital, "continent": continent, "currency": currency, "language": language}
    for name, capital, continent, currency, language in _COUNTRY_ROWS
}
ELEMENTS: dict[str, dict[str, str]] = {
    "hydrogen": {"symbol": "H", "number": "1", "state": "gas"},
    "helium": {"symbol": "He", "number": "2", "state": "gas"},
    "carbon": {"symbol": "C", "number": "6", "state": "solid"},
    "nitrogen": {"symbol": "N", "number": "7", "state": "gas"},
    "oxygen": {"symbol": "O", "number": "8", "state": "gas"},
    "neon": {"symbol": "Ne", "number": "10", "state": "gas"},
    "sodium": {"symbol": "Na", "number": "11", "state": "solid"},
    "aluminium": {"symbol": "Al", "number": "13", "state": "solid"},
    "iron": {"symbol": "Fe", "number": "26", "state": "solid"},
    "copper": {"symbol": "Cu", "number": "29", "state": "solid"},
    "bromine": {"symbol": "Br", "number": "35", "state": "liquid"},
    "silver": {"symbol": "Ag", "number": "47", "state": "solid"},
    "gold": {"symbol": "Au", "number": "79", "state": "solid"},
}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
PLANETS: dict[str, dict[str, str]] = {
    "Mercury": {"order": "first", "type": "a rocky planet", "year": "88"},
    "Venus": {"order": "second", "type": "a rocky planet", "year": "225"},
    "Earth": {"order": "third", "type": "a rocky planet", "moon": "the Moon", "year": "365"},
    "Mars": {"order": "fourth", "type": "a rocky planet", "moon": "Phobos", "year": "687"},
    "Jupiter": {"order": "fifth", "type": "a gas giant", "moon": "Ganymede", "year": "4333"},
    "Saturn": {"order": "sixth", "type": "a gas giant", "moon": "Titan", "year": "10759"},
    "Uranus": {"order": "seventh", "type": "an ice giant", "moon": "Titania", "year": "30687"},
    "Neptune": {"order": "eighth", "type": "an ice giant", "moon": "Triton", "year": "60190"},
}
FACT_BASE: dict[str, dict[str, dict[str, str]]] = {
    "country": COUNTRIES,
    "element": ELEMENTS,
    "planet": PLANETS,
}
# Property order: the order facts appear in a planned response.
PROPERTIES: dict[str, tuple[str, ...]] = {
    "country": ("capital", "continent", "currency", "language"),
    "element": ("symbol", "number", "state"),
    "planet": ("order", "type", "moon", "year"),
    "arithmetic": ("sum", "product"),
}
ARITHMETIC_OPS = {"sum": ("plus", lambda a, b: a + b), "product": ("times", lambda a, b: a * b)}

# Fact templates in sentence-internal form (capitalised at a sentence start), one per band:
# complexity 0-1, 2, 3-4. Every one has exactly one " is ", which a contradiction negates.
FACT_CORES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("country", "capital"): (
        "the capital of {e} is {v}",
        "the capital city of {e} is {v}",
        "the designated national capital of {e} is {v}",
    ),
    ("country", "continent"): (
        "{e} is in {v}",
        "{e} is located in {v}",
        "{e} is geographically situated in {v}",
    ),
    ("country", "currency"): (
        "the money used in {e} is the {v}",
        "the official currency of {e} is the {v}",
        "the legally recognised currency of {e} is the {v}",
    ),
    ("country", "language"): (
        "the main language of {e} is {v}",
        "the most widely spoken language of {e} is {v}",
        "the predominant vernacular language of {e} is {v}",
    ),
    ("element", "symbol"): (
        "the symbol for {e} is {v}",
        "the chemical symbol for {e} is {v}",
        "the standardised chemical symbol designating {e} is {v}",
    ),
    ("element", "number"): (
        "the atomic number of {e} is {v}",
        "the atomic number of the element {e} is {v}",
        "the atomic number characterising {e} is {v}",
    ),
    ("element", "state"): (
        "{e} is a {v} at room temperature",
        "{e} is a {v} at normal room temperature",
        "{e} is a {v} under standard laboratory conditions",
    ),
    ("planet", "order"): (
        "{e} is the {v} planet from the Sun",
        "{e} is the {v} planet out from the Sun",
        "{e} is the {v} planet in order of distance from the Sun",
    ),
    ("planet", "type"): (
        "{e} is {v}",
        "{e} is known as {v}",
        "{e} is astronomically classified as {v}",
    ),
    ("planet", "moon"): (
        "the biggest moon of {e} is {v}",
        "the largest moon of {e} is {v}",
        "the largest natural satellite orbiting {e} is {v}",
    ),
    ("planet", "year"): (
        "a year on {e} is about {v} Earth days long",
        "a full year on {e} is roughly {v} Earth days long",
        "the orbital period of {e} is approximately {v} Earth days",
    ),
    ("arithmetic", "sum"): (
        "{a} plus {b} is {v}",
        "{a} plus {b} is equal to {v}",
        "the arithmetical sum of {a} and {b} is {v}",
    ),
    ("arithmetic", "product"): (
        "{a} times {b} is {v}",
        "{a} multiplied by {b} is equal to {v}",
        "the arithmetical product of {a} and {b} is {v}",
    ),
}
BAND = (0, 0, 1, 2, 2)  # complexity level -> template band

# ---------------------------------------------------------------------------------------------
# Word banks by complexity level (index 0..4). Sentence-internal form: no capital, no full stop.

FACT_TAILS: tuple[tuple[str, ...], ...] = (
    ("",),
    (
        ", as most books mention",
        ", as you can easily check",
        ", as many people remember",
        ", as the books explain",
    ),
    (
        ", which is worth remembering",
        ", and this is simple to confirm",
        ", which most guidebooks point out",
        ", as most school textbooks explain",
    ),
    (
        ", which standard reference publications consistently document across editions",
        ", as authoritative educational references confirm without qualification",
        ", which encyclopaedic sources routinely corroborate in considerable detail",
        ", as specialised textbooks unanimously acknowledge in introductory chapters",
    ),
    (
        ", which authoritative encyclopaedic references consistently corroborate, notwithstanding "
        "occasional terminological inconsistencies",
        ", as comprehensive scholarly compendia systematically document, particularly within "
        "introductory curricula",
        ", which internationally recognised documentation unambiguously substantiates, "
        "notwithstanding superficial disagreements",
        ", as methodologically rigorous compilations invariably acknowledge, irrespective of "
        "presentational conventions",
    ),
)
MIDDLE_CONNECTIVES: tuple[tuple[str, ...], ...] = (
    ("Also", "Next", "And then"),
    ("Also", "Besides that", "Next"),
    ("In addition", "Building on that", "Along the same lines"),
    ("Furthermore", "Additionally", "Moreover"),
    ("Furthermore", "Correspondingly", "Moreover", "In a related vein"),
)
LAST_CONNECTIVES: tuple[tuple[str, ...], ...] = (
    ("Last",),
    ("Finally",),
    ("Finally", "To finish"),
    ("Ultimately", "In conclusion"),
    ("Ultimately", "In conclusion"),
)
CONNECTIVES: tuple[str, ...] = tuple(
    dict.fromkeys(c for bank in MIDDLE_CONNECTIVES + LAST_CONNECTIVES for c in bank)
)
ELAB_SUBJECTS: tuple[tuple[str, ...], ...] = (
    ("many people", "lots of kids", "most of us", "some people"),
    ("many students", "most books", "plenty of learners", "many teachers"),
    (
        "students in secondary schools",
        "most general guidebooks",
        "teachers of younger learners",
        "careful study notes",
    ),
    (
        "introductory educational curricula",
        "comparative reference publications",
        "standardised instructional materials",
        "specialised encyclopaedic resources",
    ),
    (
        "comprehensive interdisciplinary analyses",
        "contemporary epistemological investigations",
        "sophisticated pedagogical frameworks",
        "authoritative methodological commentaries",
    ),
)
ELAB_VERBS: tuple[tuple[str, ...], ...] = (
    (
        "like to learn about {t}",
        "ask about {t} a lot",
        "read about {t} at school",
        "want to know about {t}",
    ),
    (
        "often mention {t}",
        "include a section on {t}",
        "like to discuss {t}",
        "regularly return to {t}",
    ),
    (
        "usually describe {t} in reasonable detail",
        "frequently use {t} as an example",
        "generally mention {t} quite early",
        "carefully explain {t} step by step",
    ),
    (
        "frequently characterise {t} using standardised descriptive categories",
        "routinely present {t} alongside analogous illustrations",
        "systematically document {t} within established classifications",
        "consistently emphasise {t} as foundational knowledge",
    ),
    (
        "frequently scrutinise {t} as a paradigmatic illustration of systematic classification",
        "persistently characterise {t} through the interdependence of terminology and organisation",
        "conventionally interpret {t} as an indispensable prerequisite for advanced specialisation",
        "meticulously contextualise {t} within overarching taxonomical conventions",
    ),
)
ELAB_CLAUSES: tuple[tuple[str, ...], ...] = (
    ("",),
    (" during lessons", " for beginners", " in simple language", " every year"),
    (
        ", because the important points are easy to check",
        ", since this helps readers remember them",
        ", when they want to show how things differ",
        ", so that readers can follow the explanation",
    ),
    (
        ", which facilitates methodical comparison between otherwise unrelated examples",
        ", which encourages consistent terminology throughout subsequent instruction",
        ", particularly when learners consolidate preliminary knowledge independently",
        ", which substantially improves comprehension among inexperienced readers",
    ),
    (
        ", particularly because institutional standardisation substantially influenced subsequent "
        "curricular developments",
        ", notwithstanding considerable methodological disagreement among specialised practitioners",
        ", which consequently necessitates rigorous terminological consistency throughout "
        "comparative documentation",
        ", although interpretative heterogeneity occasionally complicates straightforward generalisation",
    ),
)
# Off-topic sentences: nothing from the fact base, written at each complexity level.
OFF_TOPIC: tuple[tuple[str, ...], ...] = (
    (
        "My cat likes to sleep all day.",
        "We had soup for lunch today.",
        "The bus was late this morning.",
        "I like to walk in the park.",
        "Our dog can run very fast.",
    ),
    (
        "My neighbour painted his fence blue last week.",
        "The bakery on my street sells fresh bread every day.",
        "I started a small garden with tomatoes and beans.",
        "Our football team won the game on Sunday.",
        "My sister is learning to play the piano at home.",
    ),
    (
        "The football match last weekend went into extra time, so the crowd stayed late.",
        "My neighbour painted his fence blue, because the old colour had faded in the rain.",
        "The new cafe near the station is busy, since it opens early every morning.",
        "Our garden needs more water, because the summer has been very dry.",
        "My sister practises the piano every evening, so she can play at the school concert.",
    ),
    (
        "Contemporary sourdough fermentation requires careful temperature regulation, which "
        "considerably influences the final texture of the bread.",
        "Professional cyclists meticulously monitor nutritional intake, particularly during "
        "long mountainous stages of professional competitions.",
        "Architectural restoration projects frequently encounter unexpected structural "
        "complications, which substantially increase the overall expenditure.",
        "Competitive orchestral auditions typically emphasise technical precision, which "
        "frequently intimidates inexperienced applicants.",
        "Residential landscaping companies increasingly recommend drought-resistant vegetation, "
        "particularly in environmentally vulnerable neighbourhoods.",
    ),
    (
        "Professional orchestral musicians frequently undertake rigorous interpretative "
        "preparation, particularly when unfamiliar contemporary compositions demand "
        "unconventional articulation.",
        "Contemporary culinary establishments increasingly experiment with fermentation "
        "methodologies, notwithstanding considerable uncertainty regarding consumer acceptance.",
        "Architectural conservation initiatives necessitate meticulous documentation of "
        "deteriorating ornamentation, particularly when historically significant structures "
        "undergo renovation.",
        "Competitive endurance athletes systematically periodise their physiological conditioning, "
        "which consequently minimises cumulative musculoskeletal strain.",
        "Municipal transportation authorities periodically reconfigure operational timetables, "
        "although passengers frequently criticise the accompanying communication inadequacies.",
    ),
)

# ---------------------------------------------------------------------------------------------
# Prompt wording.

# target sentences -> (prefixes, suffixes); each contains exactly one key of TARGET_KEYS.
LENGTH_REQUESTS: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    1: (
        ("In one sentence", "Using a single sentence", "In just one sentence"),
        ("Answer in one sentence.", "Keep it to a single sentence.", "One sentence is enough."),
    ),
    2: (
        ("Briefly", "In brief", "Keeping it brief"),
        ("Keep it brief.", "Please be brief.", "A brief answer is fine."),
    ),
    3: (
        ("In a short paragraph", "In a few sentences", "With a short paragraph"),
        ("Give a short paragraph.", "A few sentences are enough.", "Answer in a short paragraph."),
    ),
    5: (
        ("In detail", "Thoroughly", "In depth"),
        ("Explain in detail.", "Please be thorough.", "Please answer in depth."),
    ),
}
TARGET_KEYS: tuple[tuple[str, int], ...] = (
    ("one sentence", 1),
    ("single sentence", 1),
    ("brief", 2),
    ("short paragraph", 3),
    ("few sentences", 3),
    ("in detail", 5),
    ("thorough", 5),
    ("in depth", 5),
)
DESCRIBE_BODIES = (
    "tell me about {E}.",
    "describe {E}.",
    "what should I know about {E}?",
    "give me an overview of {E}.",
    "what can you tell me about {E}?",
    "explain the key facts about {E}.",
    "I would like to learn about {E}.",
    "what are the basic facts about {E}?",
    "summarise what is known about {E}.",
    "teach me something about {E}.",
)
COMPARE_BODIES = (
    "compare the {K} {E1} and {E2}.",
    "how do the {K} {E1} and {E2} differ?",
    "what are the main differences between the {K} {E1} and {E2}?",
    "set the {K} {E1} and {E2} side by side.",
)
LIST_BODIES = (
    "list some facts about the {K} {L}.",
    "what are some facts about the {K} {L}?",
    "share a few facts about the {K} {L}.",
    "say something about each of the {K} {L}.",
)
ARITHMETIC_BODIES = (
    "what is {a} {op} {b}?",
    "work out {a} {op} {b} and show the steps.",
    "explain how to calculate {a} {op} {b}.",
    "how much is {a} {op} {b}?",
)
PROMPT_OPS = {"sum": ("plus",), "product": ("times", "x", "multiplied by")}
KIND_PLURAL = {"country": "countries", "element": "elements", "planet": "planets"}
TASKS = ("describe", "compare", "list", "arithmetic")
FOLLOW_UPS = ("", "Thanks. ", "Great, thank you. ", "Now another question. ")

# ---------------------------------------------------------------------------------------------
# Label rules.

DISRUPTIONS = ("shuffle", "no_connectives", "off_topic", "contradiction")
MAX_SENTENCES = 10
# Sampling weights. One-sentence requests are rarer and low verbosity is favoured because a
# one-sentence answer can only be coherence 4 (see the module docstring): these weights keep
# every level of verbosity and coherence at about 7% or more of the rows.
TARGET_WEIGHTS = {1: 1.0, 2: 2.0, 3: 2.0, 5: 2.0}
VERBOSITY_WEIGHTS = (2.0, 1.5, 1.5, 1.0, 1.0)
HELPFULNESS_WEIGHTS = {"correctness": 0.8, "coherence": 0.25, "verbosity_fit": 0.2, "bias": -0.85}
# With these weights and noise corr(helpfulness, correctness) is about 0.85, as in HelpSteer.
HELPFULNESS_NOISE_SD = 0.6


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; the documented rule rounds half up.
    return math.floor(x + 0.5)


def verbosity_label(sentences: int, target: int) -> int:
    """Verbosity from the sentence count and the prompt's target (see the module docstring)."""
    if sentences < 1 or target < 1:
        raise ValueError(f"sentences={sentences}, target={target}: both must be >= 1")
    r = sentences / target
    if r < 0.45:
        return 0
    if r < 0.8:
        return 1
    if r <= 1.3:
        return 2
    if r < 2:
        return 3
    return 4


def correctness_label(correct: int, stated: int) -> int:
    """floor(4 * correct / stated + 0.5): the share of stated facts that are right, on 0..4."""
    if stated < 1 or not 0 <= correct <= stated:
        raise ValueError(f"correct={correct}, stated={stated}: need 0 <= correct <= stated, stated >= 1")
    return _round_half_up(4 * correct / stated)


def coherence_label(disruptions: Sequence[str]) -> int:
    """4 minus the number of distinct disruptions."""
    unknown = [d for d in disruptions if d not in DISRUPTIONS]
    if unknown or len(set(disruptions)) != len(disruptions):
        raise ValueError(f"disruptions {list(disruptions)}: allowed, each at most once: {DISRUPTIONS}")
    return 4 - len(disruptions)


def helpfulness_label(correctness: int, coherence: int, verbosity: int, noise: float = 0.0) -> int:
    """The documented helpfulness rule; the clip is of this computed value only."""
    w = HELPFULNESS_WEIGHTS
    raw = (
        w["correctness"] * correctness
        + w["coherence"] * coherence
        + w["verbosity_fit"] * (4 - 2 * abs(verbosity - 2))
        + w["bias"]
        + noise
    )
    return min(4, max(0, _round_half_up(raw)))


# Sentence counts per (target, verbosity); verbosity 4 is capped at 2*target+2 sentences so a
# "far too long" answer stays a plausible length.
_COUNTS: dict[int, dict[int, list[int]]] = {}
for _t in LENGTH_REQUESTS:
    _COUNTS[_t] = {}
    for _n in range(1, MAX_SENTENCES + 1):
        _v = verbosity_label(_n, _t)
        if _v == 4 and _n > 2 * _t + 2:
            continue
        _COUNTS[_t].setdefault(_v, []).append(_n)


def _disruptions_fit(disruptions: Sequence[str], sentences: int) -> bool:
    # Inserted sentences take slots; shuffling or dropping connectives needs two planned ones.
    inserted = sum(d in ("off_topic", "contradiction") for d in disruptions)
    planned_needed = 2 if ("shuffle" in disruptions or "no_connectives" in disruptions) else 1
    return inserted + planned_needed <= sentences


_DISRUPTION_SETS: dict[int, list[tuple[str, ...]]] = {
    k: list(combinations(DISRUPTIONS, k)) for k in range(len(DISRUPTIONS) + 1)
}

# ---------------------------------------------------------------------------------------------
# Reading text back: sentences, the length request, facts.

_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of a generated response (each ends with '.')."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def target_sentences(prompt: str) -> int | None:
    """The number of sentences the prompt's last user turn asks for; None if it asks nothing."""
    last = parse_prompt_turns(prompt)[-1].text.casefold()
    for key, target in TARGET_KEYS:
        if key in last:
            return target
    return None


def verbosity_from_text(prompt: str, response: str) -> int:
    """The verbosity rule applied to text: what the label of a generated row must be."""
    target = target_sentences(prompt)
    if target is None:
        raise ValueError(f"prompt has no length request: {prompt[-80:]!r}")
    return verbosity_label(len(split_sentences(response)), target)


@dataclass(frozen=True)
class ParsedFact:
    """A sentence that matches a fact template."""

    kind: str  # "country", "element", "planet" or "arithmetic"
    prop: str
    subject: str  # the entity, or "a op b" for arithmetic
    value: str
    negated: bool
    holds: bool  # whether the positive statement agrees with the fact base


def _alternation(values: Sequence[str]) -> str:
    unique = sorted(dict.fromkeys(values), key=lambda v: (-len(v), v))
    return "(?:" + "|".join(re.escape(v) for v in unique) + ")"


def _value_pattern(kind: str, prop: str) -> str:
    if kind == "arithmetic" or (kind, prop) in (("element", "number"), ("planet", "year")):
        return r"\d+"
    if (kind, prop) == ("planet", "order"):
        return _alternation(ORDINALS)
    return _alternation([facts[prop] for facts in FACT_BASE[kind].values() if prop in facts])


def _core_regex(core: str, kind: str, prop: str) -> str:
    groups = {
        "{v}": f"(?P<v>{_value_pattern(kind, prop)})",
        "{a}": r"(?P<a>\d+)",
        "{b}": r"(?P<b>\d+)",
    }
    if kind != "arithmetic":
        groups["{e}"] = f"(?P<e>{_alternation(list(FACT_BASE[kind]))})"
    parts = re.split(r"(\{[a-z]\})", core)
    out = []
    negation_done = False
    for part in parts:
        if part in groups:
            out.append(groups[part])
            continue
        escaped = re.escape(part)
        if not negation_done and " is " in part:
            head, _, tail = part.partition(" is ")
            escaped = re.escape(head) + r" is(?P<neg> not)? " + re.escape(tail)
            negation_done = True
        out.append(escaped)
    return "".join(out)


_CONNECTIVE_PREFIX = "(?:" + "|".join(re.escape(c) for c in CONNECTIVES) + "), "
_FACT_PATTERNS: list[tuple[str, str, re.Pattern[str]]] = [
    (
        kind,
        prop,
        re.compile(
            rf"^(?:{_CONNECTIVE_PREFIX})?{_core_regex(core, kind, prop)}(?:, [^.]*)?\.$",
            re.IGNORECASE,
        ),
    )
    for (kind, prop), cores in FACT_CORES.items()
    for core in dict.fromkeys(cores)
]
_CANONICAL = {name.casefold(): name for base in FACT_BASE.values() for name in base}


def parse_fact(sentence: str) -> ParsedFact | None:
    """Match one sentence against the fact templates; None if it states no fact."""
    sentence = sentence.strip()
    for kind, prop, pattern in _FACT_PATTERNS:
        m = pattern.match(sentence)
        if m is None:
            continue
        value = m.group("v")
        if kind == "arithmetic":
            a, b = int(m.group("a")), int(m.group("b"))
            symbol, op = ARITHMETIC_OPS[prop]
            subject = f"{a} {symbol} {b}"
            holds = op(a, b) == int(value)
        else:
            subject = _CANONICAL[m.group("e").casefold()]
            holds = FACT_BASE[kind][subject].get(prop, "").casefold() == value.casefold()
        return ParsedFact(kind, prop, subject, value, m.group("neg") is not None, holds)
    return None


def fact_is_correct(sentence: str) -> bool | None:
    """True/False for a stated (positive) fact, None for any other sentence (incl. negations)."""
    fact = parse_fact(sentence)
    if fact is None or fact.negated:
        return None
    return fact.holds


def correctness_from_text(response: str) -> int | None:
    """The correctness rule applied to text; None when the text states no fact."""
    verdicts = [fact_is_correct(s) for s in split_sentences(response)]
    stated = [v for v in verdicts if v is not None]
    if not stated:
        return None
    return correctness_label(sum(stated), len(stated))


# ---------------------------------------------------------------------------------------------
# Generation.


@dataclass(frozen=True)
class _FactSpec:
    """One fact a response can state: which template, which subject, the right value."""

    kind: str
    prop: str
    fields: tuple[tuple[str, str], ...]  # ("e", entity) or ("a", ..), ("b", ..)
    true_value: str

    def render(self, value: str, level: int, tail: str, negated: bool = False) -> str:
        core = FACT_CORES[(self.kind, self.prop)][BAND[level]]
        if negated:
            core = core.replace(" is ", " is not ", 1)
        return core.format(v=value, **dict(self.fields)) + tail

    def wrong_value(self, rng: random.Random) -> str:
        """A value that differs from the right one only in the fact (see the module docstring)."""
        if self.kind == "arithmetic" or (self.kind, self.prop) == ("element", "number"):
            true = int(self.true_value)
            offsets = [1, 2, 10] if self.kind == "arithmetic" else [1, 2, 3]
            choices = [true + s * k for k in offsets for s in (-1, 1) if true + s * k >= 1]
            return str(rng.choice(choices))
        if (self.kind, self.prop) == ("planet", "order"):
            i = ORDINALS.index(self.true_value)
            choices = [j for j in (i - 2, i - 1, i + 1, i + 2) if 0 <= j < len(ORDINALS)]
            return ORDINALS[rng.choice(choices)]
        others = [
            facts[self.prop]
            for facts in FACT_BASE[self.kind].values()
            if self.prop in facts and facts[self.prop].casefold() != self.true_value.casefold()
        ]
        return rng.choice(list(dict.fromkeys(others)))


def _entity_facts(kind: str, entity: str) -> list[_FactSpec]:
    facts = FACT_BASE[kind][entity]
    return [
        _FactSpec(kind, prop, (("e", entity),), facts[prop]) for prop in PROPERTIES[kind] if prop in facts
    ]


def _round_robin(pools: list[list[_FactSpec]]) -> list[_FactSpec]:
    out: list[_FactSpec] = []
    for i in range(max(len(p) for p in pools)):
        out.extend(p[i] for p in pools if i < len(p))
    return out


def _arithmetic_facts(prop: str, a: int, b: int) -> list[_FactSpec]:
    """The worked steps, ending with the result: tens and ones separately, then combined."""
    op = ARITHMETIC_OPS[prop][1]

    def spec(x: int, y: int, p: str = prop) -> _FactSpec:
        return _FactSpec("arithmetic", p, (("a", str(x)), ("b", str(y))), str(ARITHMETIC_OPS[p][1](x, y)))

    if prop == "product":
        tens, ones = a - a % 10, a % 10
        steps = [spec(tens, b), spec(ones, b), spec(tens * b, ones * b, "sum")]
    else:
        steps = [spec(a - a % 10, b - b % 10), spec(a % 10, b % 10)]
        steps.append(spec((a - a % 10) + (b - b % 10), a % 10 + b % 10))
    return steps + [_FactSpec("arithmetic", prop, (("a", str(a)), ("b", str(b))), str(op(a, b)))]


@dataclass(frozen=True)
class _Prompt:
    text: str
    task: str
    target: int
    facts: tuple[_FactSpec, ...]  # in planned order
    from_end: bool  # take the last facts (arithmetic: the result is the point) or the first
    topic: str  # what elaboration sentences talk about


def _display(kind: str, entity: str) -> str:
    return {
        "country": entity,
        "element": f"the element {entity}",
        "planet": f"the planet {entity}",
    }[kind]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _task_body(rng: random.Random, task: str) -> tuple[str, list[_FactSpec], bool, str, str | None]:
    """(body, facts, from_end, topic, entity the task is about) for one task."""
    if task == "arithmetic":
        prop = rng.choice(("sum", "product"))
        if prop == "product":
            a, b = rng.choice([x for x in range(12, 50) if x % 10]), rng.randint(3, 9)
        else:
            a, b = (rng.choice([x for x in range(12, 90) if x % 10]) for _ in range(2))
        body = rng.choice(ARITHMETIC_BODIES).format(a=a, b=b, op=rng.choice(PROMPT_OPS[prop]))
        kind_of_sum = "sums like this" if prop == "sum" else "multiplications like this"
        topic = rng.choice(("this calculation", kind_of_sum, "this kind of problem"))
        return body, _arithmetic_facts(prop, a, b), True, topic, None
    kind = rng.choice(("country", "element", "planet"))
    if task == "describe":
        entity = rng.choice(list(FACT_BASE[kind]))
        body = rng.choice(DESCRIBE_BODIES).format(E=_display(kind, entity))
        return body, _entity_facts(kind, entity), False, entity, entity
    if task == "compare":
        e1, e2 = rng.sample(list(FACT_BASE[kind]), 2)
        body = rng.choice(COMPARE_BODIES).format(K=KIND_PLURAL[kind], E1=e1, E2=e2)
        facts = _round_robin([_entity_facts(kind, e1), _entity_facts(kind, e2)])
        return body, facts, False, f"{e1} and {e2}", e1
    chosen = rng.sample(list(FACT_BASE[kind]), rng.choice((3, 4)))
    named = ", ".join(chosen[:-1]) + " and " + chosen[-1]
    body = rng.choice(LIST_BODIES).format(K=KIND_PLURAL[kind], L=named)
    facts = _round_robin([_entity_facts(kind, e) for e in chosen])
    return body, facts, False, f"these {KIND_PLURAL[kind]}", chosen[0]


def _earlier_exchange(rng: random.Random, entity: str | None) -> tuple[str, str]:
    """A first user question and a correct, coherent two-fact answer (complexity 1)."""
    if entity is None:
        a, b = rng.randint(11, 40), rng.randint(11, 40)
        fact = _FactSpec("arithmetic", "sum", (("a", str(a)), ("b", str(b))), str(a + b))
        question = f"What is {a} plus {b}?"
        return question, _capitalize(fact.render(fact.true_value, 1, "")) + "."
    kind = next(k for k, base in FACT_BASE.items() if entity in base)
    question = _capitalize(rng.choice(DESCRIBE_BODIES).format(E=_display(kind, entity)))
    first, second = _entity_facts(kind, entity)[:2]
    answer = (
        _capitalize(first.render(first.true_value, 1, ""))
        + ". "
        + "Also, "
        + second.render(second.true_value, 1, "")
        + "."
    )
    return question, answer


def _make_prompt(rng: random.Random, task: str, multi_turn_fraction: float) -> _Prompt:
    body, facts, from_end, topic, entity = _task_body(rng, task)
    target = rng.choices(list(TARGET_WEIGHTS), list(TARGET_WEIGHTS.values()))[0]
    prefixes, suffixes = LENGTH_REQUESTS[target]
    if rng.random() < 0.5:
        text = f"{rng.choice(prefixes)}, {body}"
    else:
        text = f"{_capitalize(body)} {rng.choice(suffixes)}"
    if rng.random() < multi_turn_fraction:
        question, answer = _earlier_exchange(rng, entity)
        last = rng.choice(FOLLOW_UPS) + text
        text = join_prompt_turns([Turn("User", question), Turn("Assistant", answer), Turn("User", last)])
    return _Prompt(text, task, target, tuple(facts), from_end, topic)


@dataclass(frozen=True)
class ResponsePlan:
    """How a response was built: what the labels were computed from.

    `planned` is the coherent version (planned order, with connectives, no inserted sentences);
    `sentences` is the response as written (" ".join(sentences) is the response). `facts` lists
    the stated facts as written, each with whether it is right. `off_topic` and `contradiction`
    are the inserted sentences, if any.
    """

    target_sentences: int
    complexity: int
    planned: tuple[str, ...]
    sentences: tuple[str, ...]
    disruptions: tuple[str, ...]
    facts: tuple[tuple[str, bool], ...]
    off_topic: str | None
    contradiction: str | None


@dataclass
class _Part:
    connective: str | None
    body: str  # sentence-internal form, no full stop
    fact: _FactSpec | None = None
    value: str = ""  # the stated value of a fact

    def text(self) -> str:
        if self.connective:
            return f"{self.connective}, {self.body}."
        return _capitalize(self.body) + "."


def _elaborations(rng: random.Random, level: int, topic: str, count: int) -> list[str]:
    combos = list(product(ELAB_SUBJECTS[level], ELAB_VERBS[level], ELAB_CLAUSES[level]))
    return [f"{s} {v.format(t=topic)}{c}" for s, v, c in rng.sample(combos, count)]


def _response(rng: random.Random, prompt: _Prompt) -> tuple[dict[str, int], ResponsePlan]:
    t = prompt.target
    # Verbosity and coherence are drawn independently and redrawn together until some sentence
    # count allows both: short answers cannot carry many disruptions, and drawing coherence after
    # the count would tie it to verbosity much more strongly.
    levels = sorted(_COUNTS[t])
    while True:
        verbosity = rng.choices(levels, [VERBOSITY_WEIGHTS[v] for v in levels])[0]
        coherence = rng.randrange(5)
        counts = [
            n
            for n in _COUNTS[t][verbosity]
            if any(_disruptions_fit(d, n) for d in _DISRUPTION_SETS[4 - coherence])
        ]
        if counts:
            break
    n = rng.choice(counts)
    level = rng.randrange(5)
    disruptions = rng.choice([d for d in _DISRUPTION_SETS[4 - coherence] if _disruptions_fit(d, n)])
    m = n - sum(d in ("off_topic", "contradiction") for d in disruptions)  # planned sentences

    # Correctness: uniform over the levels some (fact count, correct count) can reach.
    f_max = min(m, len(prompt.facts))
    reachable = {(f, c): correctness_label(c, f) for f in range(1, f_max + 1) for c in range(f + 1)}
    correctness = rng.choice(sorted(set(reachable.values())))
    f = rng.choice(sorted({fc[0] for fc, lab in reachable.items() if lab == correctness}))
    c = rng.choice([cc for (ff, cc), lab in reachable.items() if ff == f and lab == correctness])
    chosen = prompt.facts[-f:] if prompt.from_end else prompt.facts[:f]
    right = set(rng.sample(range(f), c))

    tails = FACT_TAILS[level]
    fact_parts = []
    for i, spec in enumerate(chosen):
        value = spec.true_value if i in right else spec.wrong_value(rng)
        fact_parts.append(_Part(None, spec.render(value, level, rng.choice(tails)), spec, value))
    elab_parts = [_Part(None, b) for b in _elaborations(rng, level, prompt.topic, m - f)]
    # Planned order: a fact first, the facts in order, elaborations spread over the other slots.
    elab_slots = set(rng.sample(range(1, m), m - f))
    facts_iter, elabs_iter = iter(fact_parts), iter(elab_parts)
    parts = [next(elabs_iter) if i in elab_slots else next(facts_iter) for i in range(m)]
    for i, part in enumerate(parts[1:], start=1):
        bank = LAST_CONNECTIVES if i == m - 1 else MIDDLE_CONNECTIVES
        part.connective = rng.choice(bank[level])
    planned = tuple(p.text() for p in parts)

    if "shuffle" in disruptions:
        order = list(range(m))
        while order[0] == 0:  # the opening fact must visibly move
            rng.shuffle(order)
        parts = [parts[i] for i in order]
    if "no_connectives" in disruptions:
        for part in parts:
            part.connective = None
    sentences = [p.text() for p in parts]
    contradiction = off_topic = None
    if "contradiction" in disruptions:
        fact_positions = [i for i, p in enumerate(parts) if p.fact is not None]
        at = rng.choice(fact_positions)
        source = parts[at]
        assert source.fact is not None
        contradiction = _capitalize(source.fact.render(source.value, level, rng.choice(tails), True)) + "."
        sentences.insert(rng.randint(at + 1, len(sentences)), contradiction)
    if "off_topic" in disruptions:
        off_topic = rng.choice(OFF_TOPIC[level])
        sentences.insert(rng.randint(1, len(sentences)), off_topic)

    helpfulness = helpfulness_label(correctness, coherence, verbosity, rng.gauss(0.0, HELPFULNESS_NOISE_SD))
    labels = {
        "helpfulness": helpfulness,
        "correctness": correctness,
        "coherence": coherence,
        "complexity": level,
        "verbosity": verbosity,
    }
    plan = ResponsePlan(
        target_sentences=t,
        complexity=level,
        planned=planned,
        sentences=tuple(sentences),
        disruptions=tuple(disruptions),
        facts=tuple((p.text(), p.value == p.fact.true_value) for p in parts if p.fact is not None),
        off_topic=off_topic,
        contradiction=contradiction,
    )
    return labels, plan


def _check_arguments(
    rows: int, seed: int, responses_per_prompt: tuple[int, int], multi_turn_fraction: float
) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ConfigError(f"rows={rows!r}: allowed: an integer >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r}: allowed: an integer (a string seed would not be reproducible)")
    try:
        low, high = responses_per_prompt
        ok = isinstance(low, int) and isinstance(high, int) and 1 <= low <= high
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"responses_per_prompt={responses_per_prompt!r}: allowed: (low, high) integers "
            "with 1 <= low <= high"
        )
    if (
        isinstance(multi_turn_fraction, bool)
        or not isinstance(multi_turn_fraction, (int, float))
        or not 0.0 <= multi_turn_fraction <= 1.0
    ):
        raise ConfigError(f"multi_turn_fraction={multi_turn_fraction!r}: allowed: 0.0..1.0")


def generate_with_plans(
    rows: int,
    seed: int,
    responses_per_prompt: tuple[int, int] = (2, 4),
    multi_turn_fraction: float = 0.1,
) -> list[tuple[Row, ResponsePlan]]:
    """`generate`, with each row's `ResponsePlan` beside it (for tests of the label rules)."""
    _check_arguments(rows, seed, responses_per_prompt, multi_turn_fraction)
    rng = random.Random(seed)
    low, high = responses_per_prompt
    out: list[tuple[Row, ResponsePlan]] = []
    used_prompts: set[str] = set()  # membership only: set order is never used
    while len(out) < rows:
        # A repeated prompt text is redrawn within its task type, so the four types stay
        # equally common until the smallest (describe) runs short of distinct wordings.
        task = rng.choice(TASKS)
        for attempt in range(1000):
            if attempt >= 100:
                task = rng.choice(TASKS)
            prompt = _make_prompt(rng, task, multi_turn_fraction)
            if prompt.text not in used_prompts:
                break
        else:
            raise RuntimeError(f"seed {seed}: ran out of distinct prompts after {len(out)} rows")
        used_prompts.add(prompt.text)
        count = min(rng.randint(low, high), rows - len(out))
        seen: set[str] = set()
        for _ in range(count):
            for _ in range(200):
                labels, plan = _response(rng, prompt)
                response = " ".join(plan.sentences)
                if response not in seen:
                    break
            else:
                raise RuntimeError(f"seed {seed}: no distinct response for prompt {prompt.text!r}")
            seen.add(response)
            row: Row = {
                "id": f"syn-s{seed}-{len(out):06d}",
                "prompt": prompt.text,
                "response": response,
            }
            row.update(labels)
            row["source"] = SOURCE
            out.append((row, plan))
    return out


def generate(
    rows: int,
    seed: int,
    responses_per_prompt: tuple[int, int] = (2, 4),
    multi_turn_fraction: float = 0.1,
) -> list[Row]:
    """Exactly `rows` synthetic rows; the same arguments give the same rows in any process."""
    return [row for row, _ in generate_with_plans(rows, seed, responses_per_prompt, multi_turn_fraction)]


def write_synthetic(
    out_dir: str | Path, rows: int, seed: int, shard_rows: int = 1000, **kwargs: Any
) -> list[Path]:
    """Write `generate(rows, seed, **kwargs)` as JSONL shards plus `manifest.json`.

    Refuses a non-empty folder without a synthetic manifest (it is someone else's data); an
    earlier synthetic output is replaced in place. The attribute schema is also saved beside the
    shards (`attribute_schema.json`), as for every dataset this project writes.
    """
    out = Path(out_dir)
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ConfigError(f"shard_rows={shard_rows!r}: allowed: an integer >= 1")
    unknown = sorted(set(kwargs) - {"responses_per_prompt", "multi_turn_fraction"})
    if unknown:
        raise TypeError(
            f"write_synthetic: unknown arguments {unknown}; allowed: responses_per_prompt, "
            "multi_turn_fraction"
        )
    responses_per_prompt = kwargs.get("responses_per_prompt", (2, 4))
    multi_turn_fraction = kwargs.get("multi_turn_fraction", 0.1)
    _check_arguments(rows, seed, responses_per_prompt, multi_turn_fraction)
    check_own_folder(out)
    # Generate before touching the folder, so a failure leaves an earlier output intact.
    data = generate(rows, seed, responses_per_prompt, multi_turn_fraction)

    out.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first: a folder whose manifest is present is always complete.
    (out / MANIFEST).unlink(missing_ok=True)
    for old in sorted(out.glob(SHARD_GLOB)):
        old.unlink()
    paths = []
    for number, start in enumerate(range(0, len(data), shard_rows)):
        path = out / f"synthetic-{number:05d}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in data[start : start + shard_rows]:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
    HELPSTEER.save(out)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "rows": rows,
        "seed": seed,
        "responses_per_prompt": list(responses_per_prompt),
        "multi_turn_fraction": multi_turn_fraction,
        "files": [p.name for p in paths],
        "attribute_schema": HELPSTEER.to_dict(),
    }
    write_manifest(out, manifest)
    return paths


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """`manifest.json`, written last and atomically: a folder holding one is a finished output
    (an interrupted write leaves none, so the next call refuses the folder)."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def check_own_folder(out: Path, generator: str | None = None) -> None:
    """Refuse `out` unless it is missing, empty, or a finished output of `generator`: its
    manifest has a `generator_version` and names that generator (None: this module's, whose
    manifest names none; `helpsteer_core.synthetic_oasst` names itself)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            f"{out}: folder is not empty and has no {MANIFEST}; refusing to write synthetic data "
            "into a folder this generator did not create (or whose last write was interrupted: "
            "delete it and run again)"
        )
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{manifest}: unreadable ({exc}); refusing to replace this folder") from exc
    if (
        not isinstance(content, dict)
        or "generator_version" not in content
        or content.get("generator") != generator
    ):
        raise ConfigError(
            f"{manifest}: not this generator's manifest (the folder holds no "
            f"{generator or 'synthetic'} {MANIFEST}); refusing to replace this folder"
        )
