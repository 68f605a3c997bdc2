"""The Serve app's logic without Ray: the generation engine (per-choice seeds, stop strings,
streaming, cancellation), the exact training prompt and the context check, request checks, the
typed builder args and serve/config.yaml, and best-of-n picking the known-closest candidate.

The HTTP tests against a running app are in tests/test_serve.py. `make_sft_folder` and
`make_apm_folder` are shared with them.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpsteer_core.apm import APMConfig, AttributePredictionModel, predict, save_trained_attributes
from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, HELPSTEER_ATTRIBUTES, LEVELS_FILE, STEERLM
from helpsteer_core.config import ConfigError
from helpsteer_core.conversation import Turn
from helpsteer_core.sft_data import SFTDataConfig, generation_prompt_ids
from serve.api import Frontend, Settings
from serve.app import CONFIG, AppArgs, check_config, check_exposure, load_config
from serve.engine import Choice, ChoiceDelta, GenerationJob, SamplingParams, TransformersEngine, collect
from serve.protocol import APIError, LimitArgs, resolve_attributes
from serve.steerable import PromptTooLong, SteerablePrompts, load_steerable, read_training_setup

CONTEXT = 1024


def make_sft_folder(
    tiny_generator: Path, out: Path, max_length: int = CONTEXT, condition_on: list[str] | None = None
) -> Path:
    """A trained-generator folder as train_sft writes it: the HF files, sft_config.yaml, schema."""
    shutil.copytree(tiny_generator, out)
    examples = {"template": "chat", "max_length": max_length, "system": "", "pack": False}
    if condition_on is not None:
        examples["condition_on"] = condition_on
    (out / "sft_config.yaml").write_text(
        yaml.safe_dump({"generator": str(tiny_generator), "examples": examples})
    )
    STEERLM.save(out)
    return out


def make_apm_folder(tiny_backbone: Path, out: Path) -> Path:
    """An (untrained) APM on the tiny backbone, recorded as trained on the HelpSteer five."""
    AttributePredictionModel.from_backbone(
        APMConfig(backbone=str(tiny_backbone), max_length=128)
    ).save_pretrained(out)
    save_trained_attributes(out, list(HELPSTEER_ATTRIBUTES))
    return out


@pytest.fixture(scope="module")
def sft_folder(tiny_generator: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_folder(tiny_generator, tmp_path_factory.mktemp("serve-units") / "sft")


@pytest.fixture(scope="module")
def prompts(sft_folder: Path) -> SteerablePrompts:
    return SteerablePrompts.load(sft_folder)


@pytest.fixture(scope="module")
def engine(sft_folder: Path) -> TransformersEngine:
    import torch

    torch.set_num_threads(1)
    model, tokenizer, stops = load_steerable(str(sft_folder), read_training_setup(sft_folder)["examples"])
    return TransformersEngine(model, tokenizer, stops)


def job(
    prompt: range,
    max_new: int,
    temperature: float = 1.0,
    n: int = 1,
    stop: tuple[str, ...] = (),
    seed: int = 7,
) -> GenerationJob:
    return GenerationJob(tuple(prompt), SamplingParams(max_new, temperature, 0.9, stop, seed), n)


# --- prompts --------------------------------------------------------------------------------------


def test_prompt_is_exactly_the_training_prompt_and_too_long_is_refused(prompts: SteerablePrompts):
    turns = [Turn("User", "Name a colour."), Turn("Assistant", "Blue."), Turn("User", "Another?")]
    attributes = {"helpfulness": 4, "verbosity": 1}
    config = SFTDataConfig(template="chat", max_length=CONTEXT, system="")
    expected = generation_prompt_ids(turns, attributes, prompts.tokenizer, config, STEERLM, 16)
    assert prompts.prompt_ids(turns, attributes, 16) == expected
    assert prompts.tokenizer.decode(expected).endswith(
        "<|im_start|>assistant\nAttributes: helpfulness:4,verbosity:1\n"
    )
    assert prompts.context == CONTEXT and prompts.stop_ids == (prompts.tokenizer.eos_token_id,)

    long = [Turn("User", "word " * 1500)]
    with pytest.raises(PromptTooLong, match=f"over the model's context of {CONTEXT} tokens") as caught:
        prompts.prompt_ids(long, attributes, 16)
    assert caught.value.prompt_tokens > CONTEXT  # measured whole, never trimmed to fit


# --- engine ---------------------------------------------------------------------------------------


def test_choices_depend_on_their_seed_not_on_the_batch(engine: TransformersEngine):
    alone = engine.generate(job(range(100, 140), 24, n=2))
    assert alone[0].text != alone[1].text  # choice i samples with seed + i
    steps: list[list[list[ChoiceDelta]]] = []
    others = [job(range(300, 310), 40, temperature=0.0, n=3), job(range(500, 530), 8, temperature=0.7)]
    engine.run([job(range(100, 140), 24, n=2), *others], steps.append)
    batched = collect([s[0] for s in steps], 2)
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.completion_tokens for c in collect([s[2] for s in steps], 1)] == [8]  # its own max_new_tokens
    greedy = engine.generate(job(range(100, 140), 12, temperature=0.0, n=2))
    assert greedy[0].text == greedy[1].text and greedy[0].finish_reason == "length"


def test_stop_strings_and_stream_equal_the_final_text(engine: TransformersEngine):
    full = engine.generate(job(range(100, 140), 32, temperature=0.0))[0].text
    stop = full[6:9]
    steps: list[list[ChoiceDelta]] = []
    engine.run([job(range(100, 140), 32, temperature=0.0, stop=(stop,))], lambda step: steps.append(step[0]))
    (choice,) = collect(steps, 1)
    assert choice.text == full[: full.index(stop)].rstrip() and choice.finish_reason == "stop"
    assert stop not in "".join(d.text for s in steps for d in s)  # never streamed, even in part
    assert sum(1 for s in steps for d in s if d.finish_reason) == 1  # one final delta


def test_a_cancelled_job_stops_and_leaves_the_others_running(engine: TransformersEngine):
    steps: list[list[list[ChoiceDelta]]] = []
    engine.run(
        [job(range(100, 140), 200), job(range(200, 240), 20)],
        steps.append,
        cancelled=lambda j: j == 0 and len(steps) >= 3,
    )
    first, second = collect([s[0] for s in steps], 1)[0], collect([s[1] for s in steps], 1)[0]
    assert first.finish_reason == "cancelled" and first.completion_tokens <= 4
    assert second.finish_reason == "length" and second.completion_tokens == 20
    assert len(steps) <= 21  # the 200-token job did not keep the batch going


# --- request checks -------------------------------------------------------------------------------


def test_attributes_take_profile_defaults_and_are_checked_never_clamped():
    assert resolve_attributes(None, "helpsteer2") == DEFAULT_ATTRIBUTES["helpsteer2"]
    helpsteer = resolve_attributes({"verbosity": 0, "quality": None}, "helpsteer")
    assert "quality" not in helpsteer and helpsteer["verbosity"] == 0 and helpsteer["toxicity"] == 0
    assert list(resolve_attributes({"quality": 3}, "helpsteer2"))[0] == "quality"  # schema order
    for bad, words in [
        ({"verbosty": 2}, "unknown attribute 'verbosty'; allowed: quality, toxicity"),
        ({"verbosity": 5}, "outside the range; allowed: an integer in 0..4"),
        ({"verbosity": 2.5}, "not an integer; allowed: an integer in 0..4"),
        ({"verbosity": "2"}, "not a number; allowed"),
        ({"verbosity": True}, "not a number; allowed"),
    ]:
        with pytest.raises(APIError, match=words) as caught:
            resolve_attributes(bad, "helpsteer2")
        assert caught.value.status == 400 and caught.value.param == f"attributes.{next(iter(bad))}"


# --- args and config ------------------------------------------------------------------------------


def test_serve_config_yaml_is_checked_strictly_including_keys_ray_would_drop():
    schema, args = check_config(load_config(CONFIG))
    assert args.apm == "runs/apm" and schema.http_options.host == "127.0.0.1"
    assert args.api_key_env == "HELPSTEER_API_KEY"  # the name of the variable, never a key
    for where, typo in [(("args",), "max_token"), (("args", "limits"), "max_token"), ((), "route_prefx")]:
        config = load_config(CONFIG)
        section = config["applications"][0]
        for key in where:
            section = section[key]
        section[typo] = 1
        with pytest.raises(ValueError, match=typo):
            check_config(config)
    config = load_config(CONFIG)
    config["applications"][0]["deployments"][1]["name"] = "Generater"
    with pytest.raises(ValueError, match="unknown deployment 'Generater'; allowed: Ingress, Generator, APM"):
        check_config(config)
    with pytest.raises(ValueError, match="extra"):
        AppArgs.model_validate({"generator": "x", "api_key": "secret"})


def test_config_overrides_reach_the_args():
    config = load_config(CONFIG, {"generator": "/abs/sft", "limits.max_tokens": 64, "apm": None})
    schema, args = check_config(config)
    assert (args.generator, args.limits.max_tokens, args.apm) == ("/abs/sft", 64, None)
    assert [d.name for d in schema.applications[0].deployments] == ["Ingress", "Generator"]  # no APM now
    config["applications"][0]["deployments"].append({"name": "APM", "num_replicas": 1})
    with pytest.raises(ValueError, match="APM is listed but args.apm is null"):
        check_config(config)  # Serve itself would fail the deploy for this, later and less clearly


def test_helpsteer_serve_rejects_a_bad_config_before_starting_ray(monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    import ray_jobs.runtime
    from ray_jobs.cli import app

    monkeypatch.setattr(ray_jobs.runtime, "ensure_ray", lambda: pytest.fail("Ray was started"))
    result = CliRunner().invoke(app, ["serve", "--generator", "/nowhere", "--set", "limits.max_token=64"])
    assert result.exit_code == 2
    assert "limits.max_token: unknown key" in result.output and "allowed: default_max_tokens" in result.output


# --- no open server beyond loopback -------------------------------------------------------------


def test_serving_beyond_loopback_needs_a_key_or_an_explicit_allow():
    env = {"KEY": "secret"}
    assert check_exposure("127.0.0.1", None, False, {}, "here") is None  # loopback: open is fine
    assert check_exposure("localhost", "KEY", False, {}, "here") is None
    assert check_exposure("::1", "KEY", False, {}, "here") is None
    assert check_exposure("0.0.0.0", "KEY", False, env, "here") == "secret"
    assert check_exposure("0.0.0.0", None, True, {}, "here") is None  # said so, explicitly
    for host, key_env in (("0.0.0.0", "KEY"), ("::", "KEY"), ("10.1.2.3", None), ("myhost", "KEY")):
        with pytest.raises(
            ConfigError, match=f"here: refusing to serve on {re.escape(host)} \\(beyond loopback\\)"
        ):
            check_exposure(host, key_env, False, {}, "here")
    with pytest.raises(ConfigError, match=r"\$KEY is not set.*allow_unauthenticated: true"):
        check_exposure("0.0.0.0", "KEY", False, {"OTHER": "x"}, "here")


def _helpsteer(args: list[str], env: dict[str, str], tmp_path: Path) -> Any:
    import subprocess
    import sys

    helpsteer = str(Path(sys.executable).parent / "helpsteer")
    return subprocess.run(
        [helpsteer, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_helpsteer_serve_on_all_interfaces_without_a_key_exits_2_with_the_reason(tmp_path: Path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "HELPSTEER_API_KEY"}
    done = _helpsteer(["serve", "--generator", str(tmp_path), "--host", "0.0.0.0"], env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refusing to serve on 0.0.0.0 (beyond loopback) without an API key" in done.stderr
    assert "$HELPSTEER_API_KEY is not set" in done.stderr and "Traceback" not in done.stderr


def test_helpsteer_ui_beyond_loopback_is_refused_unless_allowed(tmp_path: Path):
    import os

    done = _helpsteer(["ui", "--runs-dir", "runs", "--host", "0.0.0.0"], dict(os.environ), tmp_path)
    assert done.returncode == 2 and "refusing to expose the MLflow UI beyond loopback" in done.stderr
    # Allowed explicitly, the host passes; this runs folder has no database yet, so it stops there.
    allowed = ["ui", "--runs-dir", "runs", "--host", "0.0.0.0", "--allow-unauthenticated"]
    done = _helpsteer(allowed, dict(os.environ), tmp_path)
    assert done.returncode == 2 and "no MLflow database yet" in done.stderr, done.stderr[-2000:]


# --- best-of-n, with a known answer ---------------------------------------------------------------


class WordsGenerator:
    """Candidate i has i + 1 words."""

    async def generate(self, job: GenerationJob) -> list[Choice]:
        return [Choice(i, " ".join(["word"] * (i + 1)), "stop", i + 1) for i in range(job.n)]

    def stream(self, job: GenerationJob) -> Any:
        raise NotImplementedError

    async def ready(self) -> None:
        return None


class LengthAPM:
    """Verbosity = words in the response; the other trained attributes exactly as requested."""

    trained = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]

    async def score(self, prompt: str, responses: list[str]) -> list[list[float]]:
        rows = []
        for response in responses:
            row = [0.0] * len(STEERLM.names)
            row[STEERLM.index("helpfulness")] = row[STEERLM.index("correctness")] = 4.0
            row[STEERLM.index("coherence")] = 4.0
            row[STEERLM.index("complexity")] = 2.0
            row[STEERLM.index("verbosity")] = float(len(response.split()))
            rows.append(row)
        return rows

    async def ready(self) -> None:
        return None


def _ranking_frontend(prompts: SteerablePrompts) -> Frontend:
    limits = LimitArgs(
        max_tokens=64,
        default_max_tokens=16,
        max_n=8,
        max_responses=8,
        max_body_bytes=10_000,
        request_timeout_s=5,
    )
    return Frontend(
        Settings("helpsteer", "helpsteer2", 1.0, limits, None), prompts, WordsGenerator(), LengthAPM()
    )


def test_best_of_returns_the_candidate_closest_to_the_requested_attributes(prompts: SteerablePrompts):
    frontend = _ranking_frontend(prompts)
    messages = [{"role": "user", "content": "Say something."}]
    for verbosity in (1, 3):
        body = {"messages": messages, "attributes": {"verbosity": verbosity}, "best_of": 5, "n": 2}
        answer = asyncio.run(frontend.chat(json.dumps(body).encode()))
        first, second = answer["choices"]
        assert first["candidate"] == verbosity - 1 and first["distance"] == 0.0  # verbosity words
        assert first["message"]["content"] == " ".join(["word"] * verbosity)
        assert second["distance"] == 1.0 and first["scores"]["verbosity"] == verbosity
        assert answer["best_of"]["candidates"] == 5 and answer["usage"]["completion_tokens"] == 15
    steered = asyncio.run(
        frontend.steer(json.dumps({"prompt": "Hi", "attributes": {"verbosity": 4}, "candidates": 3}).encode())
    )
    assert (
        steered["response"] == "word word word" and steered["distance"] == 1.0
    )  # 3 words is the closest of 1..3
    assert [c["index"] for c in steered["candidates"]] == [2, 1, 0]


def test_best_of_compares_on_the_levels_of_a_generator_trained_on_ranked_apm_levels(
    tiny_generator: Path, tmp_path: Path
):
    """A generator trained on apm_quantile levels learnt level k from a band of APM predictions
    (its attribute_levels.json cut points): the APM's scores are placed on those levels before
    they are compared with the request. Here verbosity is the word count and the cuts put 4 and 5
    words at level 3, 6 words at level 4: asked for 4, the 6-word candidate is the closest."""
    folder = make_sft_folder(tiny_generator, tmp_path / "sft")
    levels = {
        "scope": "all",
        "answer_level": [],
        "cuts": {"verbosity": [1.5, 2.5, 3.5, 5.5]},
        "rows_per_level": {},
    }
    (folder / LEVELS_FILE).write_text(json.dumps(levels))
    frontend = _ranking_frontend(SteerablePrompts.load(folder))
    body = {"prompt": "Hi", "attributes": {"verbosity": 4}, "candidates": 7}
    steered = asyncio.run(frontend.steer(json.dumps(body).encode()))
    assert steered["response"] == " ".join(["word"] * 6) and steered["distance"] == 0.0
    assert steered["scores"]["verbosity"] == 6.0 and steered["levels"]["verbosity"] == 4.0
    four_words = next(c for c in steered["candidates"] if c["scores"]["verbosity"] == 4.0)
    assert four_words["levels"]["verbosity"] == 3.0 and four_words["distance"] == 1.0
    # /v1/score places its scores on the same levels, and /v1/models says which cut points.
    scored = asyncio.run(
        frontend.score(json.dumps({"prompt": "Hi", "responses": ["w " * 4, "w " * 6, "w"]}).encode())
    )
    assert [d["levels"]["verbosity"] for d in scored["data"]] == [3.0, 4.0, 0.0]
    assert [d["attributes"]["verbosity"] for d in scored["data"]] == [4.0, 6.0, 1.0]
    assert scored["data"][0]["levels"]["helpfulness"] == 4.0  # no cut points: the APM's own scale
    assert frontend.models()["data"][0]["attributes"]["level_cuts"] == {"verbosity": [1.5, 2.5, 3.5, 5.5]}
    # A folder without cut points compares on the APM's own scale: 4 words is then exact.
    plain = asyncio.run(
        _ranking_frontend(SteerablePrompts.load(make_sft_folder(tiny_generator, tmp_path / "plain"))).steer(
            json.dumps(body).encode()
        )
    )
    assert plain["response"] == " ".join(["word"] * 4) and plain["levels"] == {
        n: plain["scores"][n] for n in plain["compared_on"]
    }
    plain_scored = asyncio.run(
        _ranking_frontend(SteerablePrompts.load(tmp_path / "plain")).score(
            json.dumps({"prompt": "Hi", "responses": ["w " * 6]}).encode()
        )
    )["data"][0]
    assert plain_scored["levels"] == plain_scored["attributes"]


def test_without_an_apm_scoring_is_404_and_best_of_is_400(prompts: SteerablePrompts):
    frontend = Frontend(
        Settings("helpsteer", "helpsteer2", 1.0, LimitArgs(), None), prompts, WordsGenerator(), None
    )
    chat = {"messages": [{"role": "user", "content": "Hi"}], "best_of": 3}
    with pytest.raises(APIError, match="runs without an APM") as caught:
        asyncio.run(frontend.chat(json.dumps(chat).encode()))
    assert (caught.value.status, caught.value.param) == (400, "best_of")
    with pytest.raises(APIError, match="runs without an APM") as caught:
        asyncio.run(frontend.score(json.dumps({"prompt": "Hi", "responses": ["a"]}).encode()))
    assert caught.value.status == 404 and frontend.models()["data"][0]["apm"] is None


def test_an_ablated_generator_gets_only_its_attributes_and_says_which(tiny_generator: Path, tmp_path: Path):
    folder = make_sft_folder(tiny_generator, tmp_path / "ablated", condition_on=["verbosity", "helpfulness"])
    prompts = SteerablePrompts.load(folder)
    frontend = Frontend(
        Settings("helpsteer", "helpsteer2", 1.0, LimitArgs(), None), prompts, WordsGenerator(), None
    )
    listed = frontend.models()["data"][0]["attributes"]
    assert listed["conditioned_on"] == ["helpfulness", "verbosity"]
    asked = {**DEFAULT_ATTRIBUTES["helpsteer2"], "verbosity": 1}
    text = prompts.tokenizer.decode(prompts.prompt_ids([Turn("User", "Hi")], asked, 8))
    assert text.endswith("Attributes: helpfulness:4,verbosity:1\n")  # complexity etc. left out


# --- GPU serving: resources from the config, and the device each replica resolves -----------------


def _built_deployments(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The RayService's app built by Serve's own builder, as `helpsteer serve` binds it."""
    from ray.serve._private.build_app import build_app as serve_build

    from serve.app import bind_app, deployment_options

    app = config["applications"][0]
    for name in ("generator", "apm"):  # bind_app checks the folders exist; no weights are loaded
        (tmp_path / name).mkdir()
        app["args"][name] = str(tmp_path / name)
    schema, args = check_config(config, "cluster/kuberay/serve.yaml")
    built = serve_build(bind_app(args, deployment_options(schema)), name="helpsteer")
    return {d.name: d for d in built.deployments}


def _rayservice_config(name: str = "serve.yaml") -> dict[str, Any]:
    manifest = yaml.safe_load((CONFIG.parents[1] / "cluster" / "kuberay" / name).read_text())
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def test_config_deployment_options_reach_the_built_deployments(tmp_path: Path):
    config = _rayservice_config()
    listed = {d["name"]: d for d in config["applications"][0]["deployments"]}
    built = _built_deployments(config, tmp_path)
    # Every name the config lists is a deployment of the built app: Serve applies a RayService's
    # `deployments:` by name, so a name that matched nothing would leave the CPU defaults.
    assert set(listed) <= set(built)
    for name in ("Generator", "APM"):
        assert built[name].ray_actor_options["num_gpus"] == listed[name]["ray_actor_options"]["num_gpus"] >= 1
        assert built[name].ray_actor_options["num_cpus"] == listed[name]["ray_actor_options"]["num_cpus"]
        scaling = built[name]._deployment_config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas) == (
            listed[name]["autoscaling_config"]["min_replicas"],
            listed[name]["autoscaling_config"]["max_replicas"],
        )
    # Without a config the decorators' CPU-only defaults stand (the local profile).
    from ray.serve._private.build_app import build_app as serve_build

    from serve.app import bind_app

    plain = serve_build(
        bind_app(AppArgs(generator=str(tmp_path / "generator"), apm=str(tmp_path / "apm"))), name="cpu"
    )
    assert {d.name: d.ray_actor_options.get("num_gpus", 0) for d in plain.deployments} == {
        "Ingress": 0,
        "Generator": 0,
        "APM": 0,
    }


def test_the_vllm_rayservice_selects_vllm_and_its_llm_config_asks_for_the_gpus_it_names(tmp_path: Path):
    """serve-vllm.yaml: the app's engine is vllm, and the LLMConfig built from its args passes Ray
    Serve LLM's own schema (imported from where Ray defines it: its public module needs vLLM
    installed) with one GPU bundle per tensor-parallel worker. That the GPUs fit the pods is
    tests/test_cluster_configs.py's check, for both RayServices."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    from serve.app import _engine
    from serve.vllm import llm_config

    config = _rayservice_config("serve-vllm.yaml")
    _, args = check_config(config, "cluster/kuberay/serve-vllm.yaml")
    assert args.engine == "vllm" and _engine(args) == "vllm"
    built = LLMConfig(**llm_config("helpsteer", str(tmp_path), 4096, args.vllm))
    assert built.engine_kwargs["tensor_parallel_size"] == args.vllm.tensor_parallel_size == 4
    assert built.engine_kwargs["max_model_len"] == 4096
    assert built.model_loading_config.model_source == str(tmp_path)  # the folder, never a hub id
    assert built.accelerator_type == "H100"
    assert built.placement_group_config["bundle_per_worker"]["GPU"] == 1
    scaling = built.deployment_config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)
    # The generator is not among the listed deployments (LLMServer replaces it); the APM asks for GPUs.
    listed = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert "Generator" not in listed and listed["APM"]["ray_actor_options"]["num_gpus"] >= 1


def test_generator_options_under_the_vllm_engine_are_refused(tmp_path: Path):
    from serve.app import VLLMArgs, bind_app

    (tmp_path / "generator").mkdir()
    args = AppArgs(generator=str(tmp_path / "generator"), engine="vllm")
    with pytest.raises(
        ConfigError, match="Generator's options do not apply under the vllm engine.*args.vllm"
    ):
        bind_app(args, {"Generator": {"ray_actor_options": {"num_gpus": 4}}})
    with pytest.raises(ValueError, match="min_replicas 3 > max_replicas 2"):
        VLLMArgs(min_replicas=3, max_replicas=2)


def test_the_device_follows_the_assigned_resources():
    from ray_jobs.runtime import device_for_gpus as replica_device

    assert replica_device(1, cuda_available=True) == ("cuda", "bfloat16")
    assert replica_device(0.5, cuda_available=True) == ("cuda", "bfloat16")
    assert replica_device(0, cuda_available=True) == ("cpu", "float32")  # GPUs it did not ask for
    assert replica_device(1, cuda_available=False) == ("cpu", "float32")
    assert replica_device(0, cuda_available=False) == ("cpu", "float32")


def test_apm_loads_in_the_dtype_asked_for(tmp_path: Path, tiny_backbone: Path):
    import torch

    folder = make_apm_folder(tiny_backbone, tmp_path / "apm")
    model = AttributePredictionModel.from_pretrained(folder, STEERLM, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    pred = predict(model, model.tokenizer, ["Why?"], ["Because."], device="cpu")  # (1, n_attr)
    assert pred.shape == (1, len(STEERLM.names)) and pred.dtype.name == "float32"


# --- the vLLM client: a request's choices run at once (no vLLM here: a stand-in LLMServer) -------


class _FakeLLMServer:
    """Answers `completions` like Ray Serve LLM's LLMServer (batches of OpenAI completion events as
    server-sent-event strings), slowly,
    and records how many requests were in flight at once. Stands in for vLLM, which this machine
    cannot run; what is under test is VLLMGenerator's fan-out and merging."""

    def __init__(self, fail_index: int | None = None):
        self.in_flight = self.most = 0
        self.fail_index = fail_index

    def options(self, **_: Any) -> _FakeLLMServer:
        return self

    @property
    def completions(self) -> Any:
        server = self

        class _Method:
            def remote(self, request: dict[str, Any]) -> Any:
                return server._answer(request)

        return _Method()

    async def _answer(self, request: dict[str, Any]) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        index = request["index"]
        try:
            if not request["stream"]:  # one response with the whole text
                await asyncio.sleep(0.05)
                choice = {"text": f" c{index}s0 c{index}s1 c{index}s2", "finish_reason": "stop"}
                yield [f"data: {json.dumps({'choices': [choice], 'usage': {'completion_tokens': 3}})}\n\n"]
                return
            for step in range(3):
                await asyncio.sleep(0.02)
                if index == self.fail_index and step == 1:
                    yield [f"data: {json.dumps({'error': 'engine died'})}\n\n"]
                    return
                last = step == 2
                choice = {"text": f" c{index}s{step}", "finish_reason": "stop" if last else None}
                event = {"choices": [choice], "usage": {"completion_tokens": 3} if last else {}}
                yield [f"data: {json.dumps(event)}\n\n"]  # a batch of SSE strings, as LLMServer streams
        finally:
            self.in_flight -= 1


def test_vllm_client_runs_a_requests_choices_at_once_and_merges_them(prompts: SteerablePrompts):
    from serve.vllm import VLLMGenerator

    class Client(VLLMGenerator):
        def _request(self, job: GenerationJob, index: int, stream: bool) -> Any:
            return {"index": index, "stream": stream}  # a CompletionRequest needs vLLM installed

    job = GenerationJob((1, 2, 3), SamplingParams(max_new_tokens=3, temperature=1.0, seed=5), 3, "r")
    server = _FakeLLMServer()
    choices = asyncio.run(Client(server, "helpsteer", prompts).generate(job))
    assert [c.text for c in choices] == [f"c{i}s0 c{i}s1 c{i}s2" for i in range(3)]
    assert all(c.finish_reason == "stop" and c.completion_tokens == 3 for c in choices)
    assert server.most == 3  # the three requests were in flight together

    async def streamed(client: Client) -> list[ChoiceDelta]:
        return [delta async for step in client.stream(job) for delta in step]

    server = _FakeLLMServer()
    deltas = asyncio.run(streamed(Client(server, "helpsteer", prompts)))
    assert server.most == 3 and collect([[d] for d in deltas], 3)[2].text == "c2s0 c2s1 c2s2"
    assert [d.index for d in deltas[:3]] == [0, 1, 2]  # interleaved as they come, not one by one

    with pytest.raises(APIError, match="engine died"):
        asyncio.run(streamed(Client(_FakeLLMServer(fail_index=1), "helpsteer", prompts)))
