"""Real questions to the served steerable model at two settings of one attribute, beside the untuned model.

    helpsteer serve --generator runs/sft --apm runs/apm &          # the demo's model over HTTP
    .venv/bin/python bench/ask_served.py --url http://127.0.0.1:8000/v1 --verbosity 1 4 > answers.md
    .venv/bin/python bench/ask_served.py --attribute complexity --levels 0 4 > complexity.md

The served model is asked through the official `openai` client (`extra_body={"attributes": ...}`,
the other attributes at the server's defaults); the untuned model (the one named in
`runs/sft/sft_config.yaml`) answers the same questions through its own chat template with no
attribute line, as a user of the plain model would ask it. Every answer's prompt-answer cosine
(`helpsteer_core.relevance`), word count and Flesch-Kincaid grade are printed beside it. Markdown
on stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

QUESTIONS = [
    "What can you tell me about Estonia?",
    "What causes the seasons on Earth?",
    "How do I make my sourdough starter more active?",
    "Why is the sky blue?",
    "What should I pack for a three-day hiking trip?",
]


def untuned_answers(generator: str, questions: list[str], max_tokens: int, seed: int) -> list[str]:
    from helpsteer_core.conversation import Turn
    from helpsteer_core.generator import generate_batch, load_steerable, resolve_generator
    from helpsteer_core.sft_data import SFTDataConfig, generation_prompt_ids

    examples = {"template": "chat", "max_length": 1024}
    model, tokenizer, stop = load_steerable(resolve_generator(generator), examples, torch.bfloat16)
    config = SFTDataConfig.model_validate(examples)
    prompts = [generation_prompt_ids([Turn("User", q)], None, tokenizer, config) for q in questions]
    results = generate_batch(
        model, tokenizer, prompts, max_tokens, temperature=0.7, top_p=0.95, stop_ids=stop, seed=seed
    )
    return [r.text for r in results]


def main() -> None:
    import yaml
    from openai import OpenAI

    from helpsteer_core.relevance import relevance
    from helpsteer_core.steering import measure

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--sft", default="runs/sft", help="the served AC-SFT folder (for its base model)")
    parser.add_argument("--attribute", default="verbosity", help="the attribute set per column")
    parser.add_argument("--levels", type=int, nargs=2, default=None, help="its two values (default 1 4)")
    parser.add_argument(
        "--verbosity", type=int, nargs=2, default=None, help="--attribute verbosity --levels A B"
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    attribute, levels = args.attribute, args.levels or [1, 4]
    if args.verbosity is not None:
        attribute, levels = "verbosity", args.verbosity

    client = OpenAI(base_url=args.url, api_key="unused")
    served = {
        level: [
            client.chat.completions.create(
                model="helpsteer",
                messages=[{"role": "user", "content": q}],
                max_tokens=args.max_tokens,
                temperature=0.7,
                top_p=0.95,
                seed=args.seed,
                extra_body={"attributes": {attribute: level}},
            )
            .choices[0]
            .message.content
            or ""
            for q in QUESTIONS
        ]
        for level in levels
    }
    base = yaml.safe_load((Path(args.sft) / "sft_config.yaml").read_text())["generator"]
    untuned = untuned_answers(base, QUESTIONS, args.max_tokens, args.seed)
    columns = {f"served, {attribute} {lv}": answers for lv, answers in served.items()} | {"untuned": untuned}
    scores = {name: relevance(QUESTIONS, answers) for name, answers in columns.items()}
    grades = {name: [measure(a)["fk_grade"] for a in answers] for name, answers in columns.items()}
    for i, question in enumerate(QUESTIONS):
        print(f"### {question}\n")
        for name, answers in columns.items():
            text = answers[i].strip().replace("\n", " ")
            print(
                f"**{name}** ({len(text.split())} words, FK grade {grades[name][i]:.1f}, relevance "
                f"{scores[name][i]:.2f}): {text}\n"
            )
    print("| answers | mean relevance | mean words | mean FK grade |\n|---|---|---|---|")
    for name, answers in columns.items():
        mean = sum(scores[name]) / len(QUESTIONS)
        words = sum(len(a.split()) for a in answers) / len(QUESTIONS)
        print(f"| {name} | {mean:.2f} | {words:.0f} | {sum(grades[name]) / len(QUESTIONS):.1f} |")


if __name__ == "__main__":
    main()
