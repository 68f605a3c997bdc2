"""The steering playground (`GET /`) in a real headless Chromium, against the real Serve app of
tests/test_serve.py (tiny generator, tiny APM, an API key): the page asks for the key, presets the
profile's defaults, streams an answer at the slider values it shows, draws the APM's scores of
that answer, placed on the generator's levels, against the request, keeps the conversation across
a reload, and does best-of-n.

The browser is Debian's `chromium` (`apt-get install chromium`; .ci/run installs it), driven by
Playwright through its executable path. Without one the tests skip, except in CI.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from test_serve import KEY, Served, served  # noqa: F401 - the module's app fixture, started here too

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES

pytestmark = pytest.mark.slow

HELPSTEER2 = DEFAULT_ATTRIBUTES["helpsteer2"]
# A drawn score row: its attribute, the APM's score, the level it falls on, where the requested
# value's tick sits, how wide the bar is, and the figures printed beside it.
ROWS = (
    "rows => rows.map(r => [r.dataset.attribute, Number(r.dataset.score), Number(r.dataset.level), "
    "r.querySelector('.tick')?.style.left, r.querySelector('.bar').style.width, "
    "r.querySelector('.figures').textContent])"
)


def _chromium() -> str:
    found = os.environ.get("HELPSTEER_CHROMIUM") or shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no chromium on PATH; CI installs Debian's chromium (.ci/run)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def page(browser: Any, served: Served) -> Iterator[Any]:  # noqa: F811 - the imported fixture
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(120_000)
    try:
        yield opened
    finally:
        context.close()


def _posted(page: Any, path: str) -> list[dict[str, Any]]:
    """The JSON bodies the page POSTs to `path`, collected as it sends them."""
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda request: (
            bodies.append(json.loads(request.post_data))
            if request.method == "POST" and request.url.endswith(path)
            else None
        ),
    )
    return bodies


def _connect(page: Any, served: Served) -> None:  # noqa: F811
    page.goto(served.url + "/")
    page.wait_for_selector("#banner:not([hidden])")
    assert "needs an API key" in page.inner_text("#banner")  # the server has a key; the page has none
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("#sliders input[type=range][name=verbosity]")
    assert page.is_hidden("#banner")


def _watch_answer(page: Any) -> None:
    """Record every text the streaming answer shows (a MutationObserver on the message list)."""
    page.evaluate(
        """() => {
          window.shown = [];
          new MutationObserver(() => {
            const last = document.querySelector('#messages li.assistant:last-child .text');
            if (last && last.textContent && window.shown.at(-1) !== last.textContent)
              window.shown.push(last.textContent);
          }).observe(document.getElementById('messages'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )


def test_the_playground_streams_an_answer_at_the_slider_values_and_draws_its_scores(
    page: Any,
    served: Served,  # noqa: F811
):
    chats = _posted(page, "/v1/chat/completions")
    _connect(page, served)

    # The profile's defaults are preset; attributes outside the profile start left out.
    for name in ("helpfulness", "complexity", "verbosity"):
        assert page.input_value(f"#sliders input[name={name}]") == str(HELPSTEER2[name])
    assert page.is_disabled("#sliders input[name=humor]")

    page.locator("#sliders input[name=verbosity]").press("Home")  # the keyboard moves it to 0
    assert page.inner_text("#sliders [data-attribute=verbosity] output") == "0"
    page.fill("#max-tokens", "24")
    _watch_answer(page)
    page.fill("#prompt", "How do I boil an egg?")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#messages li.assistant .scores .score-row")

    [body] = chats
    assert body["stream"] is True and body["max_tokens"] == 24
    assert body["attributes"] == {**HELPSTEER2, "verbosity": 0}
    assert body["messages"] == [{"role": "user", "content": "How do I boil an egg?"}]
    answer = page.inner_text("#messages li.assistant .text")
    shown = page.evaluate("window.shown")
    assert answer and len(shown) > 1, shown  # it grew on the page while it streamed
    assert all(answer.startswith(text) for text in shown)

    # The drawn scores are the APM's scores of exactly that answer, against what was asked; the
    # bars stand at their levels on the generator's scale (verbosity: level 2 by its cut points).
    scored = served.post("/v1/score", {"messages": body["messages"], "responses": [answer]}).json()["data"][0]
    rows = page.eval_on_selector_all("#messages li.assistant .score-row", ROWS)
    assert {name: score for name, score, *_ in rows} == pytest.approx(scored["attributes"])
    assert {name: level for name, _, level, *_ in rows} == pytest.approx(scored["levels"])
    drawn = {name: (left, width, figures) for name, _, _, left, width, figures in rows}
    assert drawn["verbosity"][0] == "0%" and drawn["helpfulness"][0] == "100%"
    assert drawn["verbosity"][1] == "50%"  # level 2 of 0-4, wherever the raw score is
    raw = scored["attributes"]["verbosity"]
    assert drawn["verbosity"][2] == f"level 2 (APM {raw:.2f}) / 0"

    # The conversation and the key are the tab's: a reload shows both, and the next turn sends both.
    page.reload()
    page.wait_for_selector("#messages li.assistant .score-row")
    assert page.inner_text("#messages li.assistant .text") == answer
    assert page.input_value("#sliders input[name=verbosity]") == "0"
    page.fill("#prompt", "And a poached one?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('#messages li.assistant .score-row').length >= 10")
    assert [m["content"] for m in chats[1]["messages"]] == [
        "How do I boil an egg?",
        answer,
        "And a poached one?",
    ]


def test_best_of_n_asks_steer_and_shows_the_closest_candidate(page: Any, served: Served):  # noqa: F811
    steers = _posted(page, "/v1/steer")
    _connect(page, served)
    page.click("#clear")
    page.check("#best-of")
    page.fill("#candidates", "3")
    page.fill("#max-tokens", "16")
    page.fill("#prompt", "Name a fruit.")
    page.click("#send")
    page.wait_for_selector("#messages li.assistant .score-row")

    [body] = steers
    assert body["candidates"] == 3 and body["attributes"] == HELPSTEER2
    meta = page.inner_text("#messages li.assistant .meta")
    assert meta.startswith("best of 3, distance ")
    # The page shows the candidate /v1/steer ranked first: the distance it prints is the
    # Euclidean distance of the levels it draws to the request.
    rows = page.eval_on_selector_all("#messages li.assistant .score-row", ROWS)
    distance = sum((level - HELPSTEER2[name]) ** 2 for name, _, level, *_ in rows) ** 0.5
    assert float(meta.split("distance ")[1].split(";")[0]) == pytest.approx(distance, abs=1e-3)


def test_a_bad_request_is_shown_and_the_question_is_kept(page: Any, served: Served):  # noqa: F811
    models: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            models.append(request.headers.get("authorization"))
            if request.url.endswith("/v1/models")
            else None
        ),
    )
    _connect(page, served)
    page.click("#clear")  # the key field loses focus: the browser fires its change event again
    page.fill("#max-tokens", "100000")  # above the server's max_tokens
    page.fill("#prompt", "Too long an answer, please.")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#banner:not([hidden])")
    assert "max_tokens" in page.inner_text("#banner") and "400" in page.inner_text("#banner")
    assert page.input_value("#prompt") == "Too long an answer, please."
    assert page.input_value("#max-tokens") == "100000"  # sent as typed, not lowered behind the user's back
    assert page.locator("#messages li").count() == 0
    # One call without the key (refused), one with it; leaving the key field does not reconnect
    # (a reconnect racing the request used to lower max_tokens after it was typed).
    assert models == [None, f"Bearer {KEY}"]
