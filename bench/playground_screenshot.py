"""Ask the served playground one question in headless Chromium and save a screenshot of the page.

    helpsteer serve --generator runs/sft --apm runs/apm --port 8123 &
    .venv/bin/python bench/playground_screenshot.py --url http://127.0.0.1:8123/ \\
        --question "Why is the sky blue?" --set verbosity=1 --out docs/playground.png

`--set NAME=VALUE` moves a slider before sending; `--key-env` names the variable holding the
server's API key, if it has one. Uses Debian's chromium (`apt-get install chromium`) through
Playwright, as tests/test_playground.py does.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--question", action="append", required=True, help="repeat for several turns")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--key-env", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(600_000)
        page.goto(args.url)
        if args.key_env:
            page.fill("#key", os.environ[args.key_env])
            page.dispatch_event("#key", "change")
        page.wait_for_selector("#sliders input[type=range]")
        for setting in args.set:
            name, _, value = setting.partition("=")
            slider = page.locator(f"#sliders input[name={name}]")
            slider.press("Home")  # moved by the keyboard, as a person would: 0, then up
            for _ in range(int(value)):
                slider.press("ArrowRight")
        page.fill("#max-tokens", str(args.max_tokens))
        for turn, question in enumerate(args.question, start=1):
            page.fill("#prompt", question)
            page.press("#prompt", "Enter")
            page.wait_for_function(
                f"document.querySelectorAll('#messages li.assistant .scores').length >= {turn}"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
