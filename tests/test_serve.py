"""The Serve app on the local Ray head, over real HTTP: the official `openai` client with
attributes, streaming, scoring, best-of-n steering, every bad input (status, message, then a good
request), the API key, the request timeout, a generator replica killed while requests are in
flight, and both launchers (`serve run serve/config.yaml`, `helpsteer serve`).

One module-scoped app: a tiny Llama trained-generator folder (2 Generator replicas) with verbosity
cut points as an apm_quantile model has them, an untrained APM on a tiny BERT, an API key given to
the ingress replica only through its environment.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from test_serve_units import CONTEXT, make_apm_folder, make_sft_folder

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, HELPSTEER_ATTRIBUTES, LEVELS_FILE, STEERLM
from serve.app import CONFIG, AppArgs, bind_app, load_config

pytestmark = pytest.mark.slow

KEY_ENV = "HELPSTEER_TEST_API_KEY"
KEY = secrets.token_hex(16)  # a throwaway key for this module's app, never written to a file
MAX_TOKENS = 128
BODY_LIMIT = 20_000
HELPSTEER2 = DEFAULT_ATTRIBUTES["helpsteer2"]
# The served generator's verbosity levels, as train_sft writes them for apm_quantile labels: the
# untrained APM's scores (near 0) all fall on level 2, so levels and raw scores differ.
VERBOSITY_CUTS = [-100.0, -50.0, 50.0, 100.0]


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT
    port: int
    sft: Path
    apm: Path

    def post(self, path: str, body: Any = None, key: str | None = KEY, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.url}{path}", json=body, headers=headers, timeout=120, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _zero_cpus(**extra: Any) -> dict[str, Any]:
    """Every replica on 0 CPUs: the test head has 2, and torch then runs one thread per replica."""
    return {"ray_actor_options": {"num_cpus": 0, **extra}}


@pytest.fixture(scope="module")
def served(
    ray_head: Any, tiny_generator: Path, tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    sft, apm = make_sft_folder(tiny_generator, root / "sft"), make_apm_folder(tiny_backbone, root / "apm")
    levels = {"scope": "all", "answer_level": [], "cuts": {"verbosity": VERBOSITY_CUTS}, "rows_per_level": {}}
    (sft / LEVELS_FILE).write_text(json.dumps(levels))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(
        generator=str(sft),
        apm=str(apm),
        limits={"max_tokens": MAX_TOKENS, "default_max_tokens": 16, "max_body_bytes": BODY_LIMIT, "max_n": 8},
        generator_batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        api_key_env=KEY_ENV,
    )
    options = {
        "Ingress": _zero_cpus(runtime_env={"env_vars": {KEY_ENV: KEY}}),
        "Generator": {"num_replicas": 2, **_zero_cpus()},
        "APM": _zero_cpus(),
    }
    serve.run(bind_app(args, options), name="helpsteer", route_prefix="/")
    try:
        yield Served(f"http://127.0.0.1:{port}", port, sft, apm)
    finally:
        serve.shutdown()


@pytest.fixture()
def client(served: Served) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)


USER = [{"role": "user", "content": "How do I boil an egg?"}]


def good_request(served: Served) -> None:
    """What every bad-input test runs afterwards: the server still answers."""
    answer = served.post("/v1/chat/completions", {"model": "helpsteer", "messages": USER, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


# --- the OpenAI client ----------------------------------------------------------------------------


def test_openai_client_gets_a_chat_completion_with_attributes(client: Any):
    assert [m.id for m in client.models.list().data] == ["helpsteer"]
    response = client.chat.completions.create(
        model="helpsteer",
        messages=[{"role": "system", "content": "Be brief."}, *USER],
        max_tokens=8,
        temperature=0,
        extra_body={"attributes": {"verbosity": 0, "quality": 3}},
    )
    (choice,) = response.choices
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and response.usage.completion_tokens <= 8
    used = response.model_extra["attributes"]
    assert used == {"quality": 3, **HELPSTEER2, "verbosity": 0}  # defaults + request
    assert list(used) == [n for n in STEERLM.names if n in used]  # schema order, as in the prompt

    several = client.chat.completions.create(model="helpsteer", messages=USER, max_tokens=8, n=3, seed=11)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert len({c.message.content for c in several.choices}) == 3  # seed + i per choice
    again = client.chat.completions.create(model="helpsteer", messages=USER, max_tokens=8, n=3, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]


def test_streaming_yields_chunks_then_a_final_one_and_matches_the_plain_answer(client: Any, served: Served):
    settings = {"model": "helpsteer", "messages": USER, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**settings)
    plain = whole.choices[0]
    chunks = list(
        client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True})
    )
    assert (
        chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["attributes"] == HELPSTEER2
    )
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == plain.message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == plain.finish_reason
    # The usage chunk counts what the plain answer counted; "length" means the cap was reached.
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert (whole.usage.completion_tokens == 24) == (plain.finish_reason == "length"), whole.usage

    raw = served.post("/v1/chat/completions", {**settings, "stream": True}, stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_end_the_text_before_the_stop(client: Any):
    settings = {"model": "helpsteer", "messages": USER, "max_tokens": 32, "temperature": 0}
    full = client.chat.completions.create(**settings).choices[0].message.content
    stop = full[5:8]
    stopped = client.chat.completions.create(**settings, stop=[stop, "never appears"]).choices[0]
    assert stopped.message.content == full[: full.index(stop)].rstrip() and stopped.finish_reason == "stop"


# --- scoring and best-of-n ------------------------------------------------------------------------


def _distance(scores: dict[str, float], wanted: dict[str, int]) -> float:
    return math.sqrt(sum((scores[n] - wanted[n]) ** 2 for n in wanted if n in scores))


def test_score_returns_one_set_of_attributes_per_response(served: Served):
    responses = ["Put it in boiling water for 8 minutes.", "No.", "Eggs are great. " * 20]
    answer = served.post("/v1/score", {"messages": USER, "responses": responses})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert all(list(d["attributes"]) == list(HELPSTEER_ATTRIBUTES) for d in data)
    assert all(isinstance(v, float) for d in data for v in d["attributes"].values())
    alone = served.post("/v1/score", {"prompt": USER[0]["content"], "responses": responses[2:]}).json()[
        "data"
    ][0]
    assert alone["attributes"] == pytest.approx(data[2]["attributes"], abs=1e-3)  # batching changes nothing
    # Each score placed on the generator's levels: verbosity by its cut points, the rest as scored.
    for d in data:
        assert d["levels"] == {**d["attributes"], "verbosity": 2.0}
        assert -50.0 < d["attributes"]["verbosity"] < 50.0
    headers = {"Authorization": f"Bearer {KEY}"}
    model = requests.get(f"{served.url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    assert model["attributes"]["level_cuts"] == {"verbosity": VERBOSITY_CUTS}


def test_get_reward_in_openrlhfs_shape_is_the_weighted_apm_attributes(served: Served):
    from transformers import AutoTokenizer

    from serve.reward import REWARD_PRESETS

    # As OpenRLHF sends it: the actor's templated prompt (here the served generator's own chat
    # template, the default) and the batch-decoded prompt + response + eos, special tokens kept.
    actor = AutoTokenizer.from_pretrained(served.sft)
    responses = ["Put it in boiling water for 8 minutes.", "No."]
    prompt = actor.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    queries = [prompt + r + actor.eos_token for r in responses]
    answer = served.post("/get_reward", {"query": queries, "prompts": [prompt] * 2, "labels": ["", ""]})
    assert answer.status_code == 200, answer.text
    rewards = answer.json()["rewards"]
    scored = served.post("/v1/score", {"messages": USER, "responses": responses}).json()["data"]
    weights = dict(zip(STEERLM.names, REWARD_PRESETS["llama3-70b-rewardbench"], strict=True))
    expected = [sum(weights[n] * v for n, v in d["attributes"].items()) for d in scored]
    assert rewards == pytest.approx(expected, abs=1e-3)
    # Without `prompts` the split is at the last assistant header: the same rewards.
    alone = served.post("/get_reward", {"query": queries}).json()["rewards"]
    assert alone == pytest.approx(rewards, abs=1e-3)
    assert served.post("/get_reward", {"query": queries}, key=None).status_code == 401
    bad = served.post("/get_reward", {"query": ["no template"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query[0]"


def test_best_of_returns_the_candidate_closest_to_the_request(client: Any, served: Served):
    wanted = {**HELPSTEER2, "verbosity": 0}
    steered = served.post(
        "/v1/steer", {"messages": USER, "attributes": {"verbosity": 0}, "candidates": 4, "max_tokens": 12}
    )
    assert steered.status_code == 200, steered.text
    body = steered.json()
    candidates = body["candidates"]
    assert len(candidates) == 4 and body["compared_on"] == list(HELPSTEER_ATTRIBUTES)
    assert [c["distance"] for c in candidates] == sorted(c["distance"] for c in candidates)
    assert body["response"] == candidates[0]["text"] and body["distance"] == candidates[0]["distance"]
    rescored = served.post(
        "/v1/score", {"messages": USER, "responses": [c["text"] for c in candidates]}
    ).json()["data"]
    for candidate, again in zip(candidates, rescored, strict=True):
        # The distance is on the generator's levels (verbosity placed by its cut points).
        assert again["levels"] == pytest.approx(candidate["levels"], abs=1e-3)
        assert _distance(again["levels"], wanted) == pytest.approx(candidate["distance"], abs=2e-3)

    response = client.chat.completions.create(
        model="helpsteer",
        messages=USER,
        max_tokens=12,
        n=1,
        extra_body={"best_of": 4, "attributes": {"verbosity": 0}},
    )
    (best,) = response.choices
    assert response.model_extra["best_of"]["candidates"] == 4
    assert set(best.model_extra["scores"]) == set(HELPSTEER_ATTRIBUTES)
    assert _distance(best.model_extra["levels"], wanted) == pytest.approx(
        best.model_extra["distance"], abs=2e-3
    )


# --- bad input ------------------------------------------------------------------------------------


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "helpsteer", "messages": USER, "max_tokens": 4, **fields}


ATTRIBUTE_RANGE = "allowed: an integer in 0..4"
# case: (body, status, error code, words the message must contain)
BAD_REQUESTS = {
    "unknown attribute": (
        _chat(attributes={"verbosty": 2}),
        400,
        "invalid_attribute",
        "unknown attribute 'verbosty'; allowed: quality, toxicity",
    ),
    "out of range": (
        _chat(attributes={"verbosity": 5}),
        400,
        "invalid_attribute",
        f"'verbosity' = 5 is outside the range; {ATTRIBUTE_RANGE}",
    ),
    "negative": (
        _chat(attributes={"helpfulness": -1}),
        400,
        "invalid_attribute",
        f"outside the range; {ATTRIBUTE_RANGE}",
    ),
    "non-integer": (
        _chat(attributes={"verbosity": 2.5}),
        400,
        "invalid_attribute",
        f"'verbosity' = 2.5 is not an integer; {ATTRIBUTE_RANGE}",
    ),
    "string value": (
        _chat(attributes={"verbosity": "2"}),
        400,
        "invalid_attribute",
        f"is not a number; {ATTRIBUTE_RANGE}",
    ),
    "empty messages": (
        _chat(messages=[]),
        400,
        "empty_messages",
        "messages is empty; allowed: a list of messages",
    ),
    "prompt longer than the context": (
        _chat(messages=[{"role": "user", "content": "egg " * 1500}]),
        400,
        "context_length_exceeded",
        f"over the model's context of {CONTEXT} tokens; shorten the messages or lower max_tokens",
    ),
    "max_tokens above the cap": (
        _chat(max_tokens=MAX_TOKENS + 1),
        400,
        "above_cap",
        f"max_tokens {MAX_TOKENS + 1} is above this server's cap of {MAX_TOKENS}; allowed: 1..{MAX_TOKENS}",
    ),
    "n above the cap": (_chat(n=9), 400, "above_cap", "n 9 is above this server's cap of 8; allowed: 1..8"),
    "misspelt field": (
        _chat(atributes={"verbosity": 1}),
        400,
        "invalid_field",
        "unknown field 'atributes'; allowed: attributes,",
    ),
    "last message not the user's": (
        _chat(messages=[*USER, {"role": "assistant", "content": "Boil it."}]),
        400,
        "invalid_message",
        "must be from the user",
    ),
    "unknown role": (
        _chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "invalid_message",
        "role 'tool'; allowed: system, developer, user, assistant",
    ),
    "unknown model": (
        _chat(model="gpt-4"),
        404,
        "model_not_found",
        "model 'gpt-4' not found; available: helpsteer",
    ),
    "streamed best_of": (
        _chat(best_of=3, stream=True),
        400,
        "invalid_field",
        "best_of > n cannot be streamed",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_what_is_wrong_and_allowed_then_serving_goes_on(served: Served, case: str):
    body, status, code, message = BAD_REQUESTS[case]
    answer = served.post("/v1/chat/completions", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and message in error["message"], error
    good_request(served)


def test_a_body_over_the_size_limit_is_413_with_or_without_a_length(served: Served):
    big = _chat(messages=[{"role": "user", "content": "x" * BODY_LIMIT}])
    answer = served.post("/v1/chat/completions", big)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"
    assert f"allowed: at most {BODY_LIMIT} bytes" in answer.json()["error"]["message"]
    chunked = requests.post(
        f"{served.url}/v1/chat/completions",
        data=(part for part in [json.dumps(big).encode()[:15_000], json.dumps(big).encode()[15_000:]]),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=60,
    )  # a generator body: chunked, no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    broken = served.post("/v1/chat/completions", data="{not json")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    good_request(served)


def test_openai_client_surfaces_the_message(client: Any, served: Served):
    import openai

    with pytest.raises(
        openai.BadRequestError, match="outside the range; allowed: an integer in 0..4"
    ) as caught:
        client.chat.completions.create(
            model="helpsteer", messages=USER, extra_body={"attributes": {"verbosity": 9}}
        )
    assert caught.value.status_code == 400
    good_request(served)


def test_the_api_key_is_checked_and_health_is_open(served: Served):
    for key in (None, "wrong"):
        answer = served.post("/v1/chat/completions", _chat(), key=key)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{served.url}/v1/models", timeout=30).status_code == 401
    health = requests.get(f"{served.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "generator": "ok", "apm": "ok"}
    good_request(served)


# --- timeout --------------------------------------------------------------------------------------


def test_requests_time_out_and_the_generation_is_cancelled(served: Served):
    from ray import serve

    args = AppArgs(
        generator=str(served.sft), limits={"max_tokens": 1000, "request_timeout_s": 1.0}, api_key_env=None
    )
    serve.run(
        bind_app(args, {"Ingress": _zero_cpus(), "Generator": _zero_cpus()}),
        name="slow",
        route_prefix="/slow",
    )
    try:
        long = {"messages": USER, "max_tokens": 900, "n": 8}
        started = time.monotonic()
        answer = served.post("/slow/v1/chat/completions", long, key=None)
        assert answer.status_code == 408, answer.text
        assert (
            answer.json()["error"]["code"] == "request_timeout"
            and "within 1 s" in answer.json()["error"]["message"]
        )
        assert time.monotonic() - started < 10

        stream = served.post("/slow/v1/chat/completions", {**long, "stream": True}, key=None, stream=True)
        events = [line for line in stream.iter_lines(decode_unicode=True) if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"

        # The timed-out generations were cancelled: a short request is not stuck behind them.
        short = served.post("/slow/v1/chat/completions", {"messages": USER, "max_tokens": 2}, key=None)
        assert short.status_code == 200, short.text
    finally:
        serve.delete("slow")


# --- a replica dies -------------------------------------------------------------------------------


def _generator_replicas() -> dict[str, int]:
    from ray.util.state import list_actors

    found = list_actors(
        filters=[("class_name", "=", "ServeReplica:helpsteer:Generator"), ("state", "=", "ALIVE")]
    )
    return {a.actor_id: a.pid for a in found}


def _cpu_seconds(pids: dict[str, int], over: float) -> dict[str, float]:
    """CPU seconds each process used in the next `over` seconds."""
    import psutil

    processes = {key: psutil.Process(pid) for key, pid in pids.items()}
    before = {key: sum(p.cpu_times()[:2]) for key, p in processes.items()}
    time.sleep(over)
    return {key: sum(p.cpu_times()[:2]) - before[key] for key, p in processes.items()}


def _stream(
    served: Served, body: dict[str, Any], started: threading.Barrier, first: list[float]
) -> dict[str, Any]:
    """One streamed chat; appends the time of its first content to `first`, then waits at `started`."""
    response = served.post("/v1/chat/completions", {**body, "stream": True}, stream=True)
    text, error, done, ended = "", None, False, None
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        if line == "data: [DONE]":
            done, ended = True, time.monotonic()
            continue
        event = json.loads(line.removeprefix("data: "))
        if "error" in event:
            error = event["error"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            if not text:
                first.append(time.monotonic())
                started.wait(60)
            text += event["choices"][0]["delta"]["content"]
    return {"status": response.status_code, "text": text, "error": error, "done": done, "ended": ended}


def test_a_killed_generator_replica_fails_at_most_its_streams_and_comes_back(served: Served):
    from ray import serve

    replicas = _generator_replicas()
    assert len(replicas) == 2
    long = {"model": "helpsteer", "messages": USER, "max_tokens": MAX_TOKENS, "temperature": 1.0}
    streams_n, waves = 4, []
    with ThreadPoolExecutor(max_workers=16) as pool:
        # The streams go first and alone, so a replica that burns CPU is carrying a stream and
        # killing it must exercise the stream error path. They must also be one wave: a stream
        # that missed its replica's batch starts only when that batch ends, and by then the
        # others are about to finish, so a kill could find the victim's streams done. A wave
        # that started over more than half a second is let finish and sent again.
        for _ in range(5):
            started, first = threading.Barrier(streams_n + 1), []
            streams = [pool.submit(_stream, served, long, started, first) for _ in range(streams_n)]
            started.wait(120)
            waves.append(max(first) - min(first))
            if waves[-1] < 0.5:
                break
            for f in streams:
                f.result(timeout=180)
        else:
            pytest.fail(f"no wave of {streams_n} streams started together (spreads {waves} s)")
        busy = _cpu_seconds(replicas, 0.2)
        victim_id = max(busy, key=busy.__getitem__)
        victim_pid = replicas[victim_id]
        assert busy[victim_id] > 0.05, busy  # it is generating
        # Plain requests now: some are routed to the victim, queued behind its streams' batch.
        plain = [pool.submit(served.post, "/v1/chat/completions", {**long, "n": 4}) for _ in range(8)]
        time.sleep(0.1)
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        answers = [f.result(timeout=180) for f in plain]
        streamed = [f.result(timeout=180) for f in streams]

    # The precondition held: the victim was generating, so not every stream had ended.
    assert any(s["ended"] is None or s["ended"] > killed for s in streamed), streamed
    # Plain requests on the dead replica were sent again to the live one: none failed.
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    # A stream that was on it cannot be replayed: it ends with an error event, never silently.
    failed = [s for s in streamed if s["error"] is not None]
    assert failed, "no stream was on the killed replica: the error path was not exercised"
    assert [s["error"]["code"] for s in failed] == ["replica_unavailable"] * len(failed), failed
    assert all(s["done"] and s["status"] == 200 for s in streamed)  # every stream ended with [DONE]

    # Serve replaces the replica by itself.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = _generator_replicas()
        status = serve.status().applications["helpsteer"].deployments["Generator"].status
        if len(now) == 2 and victim_id not in now and status == "HEALTHY":
            break
        time.sleep(2)
    else:
        pytest.fail(f"the Generator did not get back to 2 healthy replicas: {_generator_replicas()}")
    assert victim_pid not in _generator_replicas().values()
    good_request(served)


# --- launchers ------------------------------------------------------------------------------------


def _launcher_config(served: Served, tmp_path: Path, name: str) -> Path:
    """serve/config.yaml for the tiny folders, as app `name` at /name on the module's Serve."""
    config = load_config(CONFIG, {"generator": str(served.sft), "apm": None, "api_key_env": None})
    config["http_options"]["port"] = served.port
    app = config["applications"][0]
    app.update(name=name, route_prefix=f"/{name}")
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
        deployment.pop("autoscaling_config", None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait_for(url: str, process: subprocess.Popen | None = None, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"launcher exited with {process.returncode}: {output[-5000:]}")
        try:
            answer = requests.get(url, timeout=10)
            if answer.status_code == 200:
                return answer.json()
        except requests.RequestException:
            pass
        time.sleep(2)
    from ray import serve

    raise AssertionError(f"{url} did not answer 200 within {timeout} s; Serve: {serve.status().applications}")


def test_serve_run_with_the_config_file_starts_the_app(served: Served, tmp_path: Path):
    from ray import serve

    config = _launcher_config(served, tmp_path, "from-config")
    serve_bin = Path(sys.executable).parent / "serve"
    result = subprocess.run(
        [str(serve_bin), "run", "--non-blocking", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        models = _wait_for(f"{served.url}/from-config/v1/models")
        assert models["data"][0]["context_length"] == CONTEXT and models["data"][0]["apm"] is None
        answer = requests.post(f"{served.url}/from-config/v1/chat/completions", json=_chat(), timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        serve.delete("from-config")


def test_helpsteer_serve_starts_the_app_and_ctrl_c_removes_it(served: Served, tmp_path: Path):
    from ray import serve

    config = _launcher_config(served, tmp_path, "cli")
    helpsteer = Path(sys.executable).parent / "helpsteer"
    process = subprocess.Popen(
        [str(helpsteer), "serve", "--config", str(config), "--set", "limits.max_tokens=32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )  # fmt: skip
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        for line in process.stdout or []:
            lines.append(line)
            if line.startswith("serving http://"):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(300), "".join(lines)
        assert f"serving http://127.0.0.1:{served.port}/cli" in "".join(lines)
        models = _wait_for(f"{served.url}/cli/v1/models", process)
        assert models["data"][0]["max_tokens"] == 32  # the --set override reached the app
        answer = requests.post(f"{served.url}/cli/v1/chat/completions", json=_chat(max_tokens=33), timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "above_cap"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        reader.join(timeout=10)
    assert process.returncode == 0 and "stopped" in "".join(lines), "".join(lines)
    assert "cli" not in serve.status().applications
    assert "helpsteer" in serve.status().applications  # the other apps on the cluster stay
    good_request(served)
