"""The AC-SFT stage on a local Ray cluster: DeepSpeed ZeRO-3 across 2 CPU workers, an exported
model that loads and generates, a loss that does not depend on how a batch is cut, resume, and a
killed worker that the run survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from conftest import model_loads_here
from ray.util.state import list_actors
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpsteer_core.attributes import STEERLM, load_and_check_schema
from helpsteer_core.conversation import Turn
from helpsteer_core.generator import load_steerable, read_training_setup
from helpsteer_core.lora import ADAPTER_FOLDER, LoRASettings
from helpsteer_core.sft_data import SFTDataConfig, SFTStats, generation_prompt_ids
from ray_jobs.deepspeed_engine import DeepSpeedSettings, build_config
from ray_jobs.tracking import TrackingConfig, runs_for
from ray_jobs.train_sft import REGISTERED_NAME, TrainSFTConfig, build_examples, plan, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
LORA_SETTINGS = LoRASettings.model_validate(LORA)


def _config(data: Path, generator: Path, root: Path, **overrides: Any) -> TrainSFTConfig:
    values = {
        "data": str(data / "train"),
        "validation": str(data / "validation"),
        "out": str(root / "sft"),
        "generator": str(generator),
        "examples": {"template": "chat", "max_length": 192},
        "deepspeed": {"zero_stage": 3},
        "num_workers": 2,
        "micro_batch_size": 1,
        "accumulation_steps": 2,
        "max_steps": 8,
        "lr": 2e-3,
        "checkpoint_every": 4,
        "eval_every": 4,
        "run_name": "tiny-sft",
        "storage": str(root / "ray_train"),
        "tracking": {"runs_dir": str(root / "runs")},
    }
    return TrainSFTConfig.model_validate(values | overrides)


def _history(runs: Path, metric: str) -> dict[int, float]:
    tracking = TrackingConfig(runs_dir=str(runs))
    latest = runs_for(tracking, "train_sft")[0]
    history = mlflow.MlflowClient(tracking.uri()).get_metric_history(latest.info.run_id, metric)
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def zero3_run(ray_head, synthetic_filtered, tiny_generator, tmp_path_factory) -> tuple[TrainSFTConfig, dict]:
    root = tmp_path_factory.mktemp("sft-zero3")
    config = _config(synthetic_filtered, tiny_generator, root)
    with model_loads_here() as loads:
        result = run(config)
    return config, result | {"driver_loads": loads}


def test_zero3_on_two_workers_learns_and_exports_a_model_that_generates(zero3_run):
    config, result = zero3_run
    assert result["driver_loads"] == []  # the workers load the generator; the driver, its tokenizer
    assert result["steps"] == 8 and result["global_batch_rows"] == 4  # micro 1 x accumulation 2 x 2 workers
    loss = _history(Path(config.tracking.runs_dir), "loss")
    assert sorted(loss) == list(range(1, 9))
    assert (loss[7] + loss[8]) / 2 < (loss[1] + loss[2]) / 2 - 0.05
    for metric in ("lr", "grad_norm", "tokens_per_s"):
        assert sorted(_history(Path(config.tracking.runs_dir), metric)) == list(range(1, 9))
    assert set(_history(Path(config.tracking.runs_dir), "val_loss")) == {4, 8}

    out = Path(config.out)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert load_and_check_schema(out, STEERLM) == STEERLM
    with safe_open(out / "model.safetensors", "pt") as weights:  # consolidated 16-bit weights
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    turns = [Turn("User", "Describe France in one sentence.")]
    prompt = generation_prompt_ids(turns, {"verbosity": 4}, tokenizer, SFTDataConfig(template="chat"))
    # The exported chat template steers with no code of ours: HF-native tools get the same prompt.
    messages = [{"role": "user", "content": "Describe France in one sentence."}]
    native = tokenizer.apply_chat_template(messages, add_generation_prompt=True, attributes={"verbosity": 4})
    assert list(native["input_ids"] if "input_ids" in native else native) == prompt
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > len(prompt)

    # The exported weights are the trained ones, not the starting point.
    start = AutoModelForCausalLM.from_pretrained(config.generator)
    assert not torch.allclose(
        start.get_input_embeddings().weight, model.get_input_embeddings().weight.float(), atol=1e-3
    )
    versions = mlflow.MlflowClient(
        TrackingConfig(runs_dir=config.tracking.runs_dir).uri()
    ).search_model_versions(f"name='{REGISTERED_NAME}'")
    assert [v.source for v in versions] == [out.as_uri()]


def test_rerun_with_the_same_name_resumes_from_the_last_checkpoint(zero3_run):
    config, _ = zero3_run
    result = run(config.model_copy(update={"max_steps": 10}))
    assert result["steps"] == 10
    # The new MLflow run logged only the two steps the first run had not done.
    assert sorted(_history(Path(config.tracking.runs_dir), "loss")) == [9, 10]


def test_fewer_steps_than_the_run_has_trained_is_refused_not_the_longer_model_exported(zero3_run):
    """max_steps is not in the identity (a larger one continues); a smaller one would resume past
    its end and export the step-10 model as a 4-step one. It is refused, naming both steps."""
    config, _ = zero3_run
    out = Path(config.out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"max_steps 4: .* has trained to step 10 already.*max_steps >= 10"):
        run(config.model_copy(update={"max_steps": 4}))
    assert (out / "model.safetensors").read_bytes() == before  # restart=true: tests/test_fingerprints.py


def test_a_changed_lr_into_the_same_runs_folder_trains_from_step_1_and_exports_other_weights(zero3_run):
    """`helpsteer train-sft` again with the same out, storage and run_name but another lr: a new
    run under its own identity, from step 1, not the finished run re-exported."""
    config, _ = zero3_run
    out = Path(config.out)
    with safe_open(out / "model.safetensors", "pt") as weights:
        before = {name: weights.get_tensor(name) for name in weights.keys()}
    run(config.model_copy(update={"lr": 7e-4, "checkpoint_every": 8}))
    assert sorted(_history(Path(config.tracking.runs_dir), "loss")) == list(range(1, 9))
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert any(not torch.equal(before[name], weights.get_tensor(name)) for name in weights.keys())
    assert len(list(Path(config.storage).glob(f"{config.run_name}-*"))) == 2  # the first run is kept


def test_loss_does_not_depend_on_micro_batch_accumulation_or_workers(
    ray_head, synthetic_filtered, tiny_generator, tmp_path
):
    """The same 4-row global batches cut three ways: 1 worker x micro 1 x accumulation 4, 1 worker
    x micro 4 x accumulation 1, and 2 workers x micro 2 x accumulation 1. The loss of every step,
    and so every update before it, must agree."""
    layouts = [(1, 1, 4), (1, 4, 1), (2, 2, 1)]
    losses = []
    for workers, micro, accumulation in layouts:
        root = tmp_path / f"w{workers}-m{micro}-a{accumulation}"
        config = _config(
            synthetic_filtered,
            tiny_generator,
            root,
            validation=None,
            num_workers=workers,
            micro_batch_size=micro,
            accumulation_steps=accumulation,
            max_steps=3,
            checkpoint_every=3,
            deepspeed={"zero_stage": 2},
        )
        run(config)
        losses.append(_history(root / "runs", "loss"))
    first = losses[0]
    assert sorted(first) == [1, 2, 3]
    assert first[3] < first[1]  # the updates did something
    for other in losses[1:]:
        assert other == pytest.approx(first, rel=1e-4)


def _registered_checkpoints(storage: Path) -> list[dict[str, Any]]:
    snapshot = storage / "checkpoint_manager_snapshot.json"
    return json.loads(snapshot.read_text())["checkpoint_results"] if snapshot.is_file() else []


def _run_folder(config: TrainSFTConfig) -> Path | None:
    """The config's Ray Train run folder, storage/<run_name>-<identity>, once it exists."""
    found = list(Path(config.storage).glob(f"{config.run_name}-*"))
    return found[0] if found else None


def _train_workers() -> list[Any]:
    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({}, id="full-zero3"),
        # LoRA: checkpoints hold only the adapters and their optimizer states; the base is rebuilt.
        pytest.param({"lora": LORA, "deepspeed": {"zero_stage": 0}, "lr": 2e-2}, id="lora-zero0"),
    ],
)
def test_killed_worker_restarts_from_the_last_checkpoint_and_finishes(
    ray_head, synthetic_filtered, tiny_generator, tmp_path, variant
):
    config = _config(
        synthetic_filtered,
        tiny_generator,
        tmp_path,
        max_steps=16,
        checkpoint_every=4,
        eval_every=100,
        **variant,
    )
    (tmp_path / "sft.yaml").write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    job = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.train_sft", "--config", str(tmp_path / "sft.yaml")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    # registered, not just uploaded: a restart finds it
    while (storage := _run_folder(config)) is None or not _registered_checkpoints(storage):
        assert job.poll() is None, job.stdout.read() if job.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(1)
    [victim, *_] = sorted(_train_workers(), key=lambda actor: actor.pid)
    os.kill(victim.pid, signal.SIGKILL)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    # The restarted worker group picked up from a checkpoint, not from step 0 ...
    restarts = [line for line in output.splitlines() if "steps " in line and "..16" in line]
    assert len(restarts) == 2, output[-3000:]
    assert "steps 0..16" in restarts[0] and "steps 0..16" not in restarts[1]
    # ... and the run ended with the step count it was asked for.
    steps = _history(tmp_path / "runs", "loss")
    assert max(steps) == 16 and set(range(1, 17)) <= set(steps)
    state = [json.loads(p.read_text())["step"] for p in storage.glob("checkpoint_*/trainer_state.json")]
    assert max(state) == 16
    assert (Path(config.out) / "model.safetensors").is_file()
    if config.lora is not None:
        assert (Path(config.out) / ADAPTER_FOLDER / "adapter_model.safetensors").is_file()
        # The checkpoints left the frozen base out: far smaller than the model's own weights.
        weights = (Path(config.generator) / "model.safetensors").stat().st_size
        newest = max(storage.glob("checkpoint_*"), key=lambda folder: folder.stat().st_mtime)
        module = sum(f.stat().st_size for f in (newest / "deepspeed").rglob("*model_states.pt"))
        assert module < weights / 4, (module, weights)


def test_bf16_zero1_with_the_top_layer_trained_leaves_the_rest_as_loaded(
    ray_head, synthetic_filtered, tiny_generator, tmp_path
):
    """The local profile's layout on CPU: bf16 under ZeRO-1 (DeepSpeed's BF16_Optimizer) and
    `trainable_layers`. The loss falls; the export changed the top layer and final norm only."""
    config = _config(
        synthetic_filtered,
        tiny_generator,
        tmp_path,
        deepspeed={"zero_stage": 1, "precision": "bf16"},
        trainable_layers=1,
        num_workers=1,
        accumulation_steps=4,
        max_steps=8,
        lr=1e-2,
    )
    result = run(config)
    assert result["steps"] == 8
    loss = _history(Path(config.tracking.runs_dir), "loss")
    assert (loss[7] + loss[8]) / 2 < (loss[1] + loss[2]) / 2 - 0.05
    start = AutoModelForCausalLM.from_pretrained(config.generator).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(config.out, dtype=torch.float32).state_dict()
    changed = {
        name
        for name, weight in trained.items()
        if not torch.equal(weight, start[name].to(torch.bfloat16).float())
    }
    assert changed and all(name.startswith(("model.layers.1.", "model.norm.")) for name in changed), changed


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return {name: weights.get_tensor(name).float() for name in weights.keys()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lora_trains_exports_merged_weights_and_adapter_and_never_shares_a_full_runs_checkpoint(
    ray_head, synthetic_filtered, tiny_generator, tmp_path, stage
):
    """A full-model run, then a LoRA run with the same run_name and storage (2 workers, ZeRO-1, 2
    or 3): the LoRA run starts at step 1 in its own folder, learns, and exports merged weights
    that changed only the adapted layers, plus peft's adapter; the full run then resumes its own
    checkpoint, not the LoRA one."""
    common = {"validation": None, "deepspeed": {"zero_stage": stage}, "export_dtype": "float32"}
    full = _config(synthetic_filtered, tiny_generator, tmp_path, max_steps=2, checkpoint_every=2, **common)
    run(full)
    first = json.loads((Path(full.out) / "training.json").read_text())
    assert first["steps"] == 2 and first["resumed_from_step"] == 0
    assert 0 < first["train_seconds"] <= first["seconds"]
    lora = full.model_copy(update={"lora": LORA_SETTINGS, "max_steps": 8, "checkpoint_every": 4, "lr": 2e-2})
    assert run(lora)["steps"] == 8
    loss = _history(tmp_path / "runs", "loss")
    assert sorted(loss) == list(range(1, 9))  # from step 1: the full run's checkpoint was not resumed
    assert (loss[7] + loss[8]) / 2 < (loss[1] + loss[2]) / 2 - 0.05
    assert len(list(Path(full.storage).glob(f"{full.run_name}-*"))) == 2

    out = Path(lora.out)
    setup = read_training_setup(out)
    assert setup["lora"]["r"] == 4 and setup["exported"] == {
        "weights": "merged-lora",
        "adapter": ADAPTER_FOLDER,
    }
    start, merged = _weights(Path(tiny_generator)), _weights(out)
    assert set(merged) == set(start)  # a plain Llama: no adapter tensors in the merged weights
    changed = {name for name in start if not torch.equal(start[name], merged[name])}
    targets = ("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight")
    assert changed and all(name.endswith(targets) for name in changed), changed
    # evaluate and Serve load it as they load a full-model output, and it generates with the KV
    # cache on (training turned it off, and the merged model was rebuilt from that config).
    assert json.loads((out / "generation_config.json").read_text()).get("use_cache", True) is True
    model, tokenizer, stop_ids = load_steerable(str(out), setup["examples"])
    assert model.generation_config.use_cache is True
    turns = [Turn("User", "Describe France in one sentence.")]
    prompt = generation_prompt_ids(turns, {"verbosity": 4}, tokenizer, SFTDataConfig(template="chat"))
    assert model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False).shape[1] > len(prompt)
    # The adapter on the starting model computes what the merged weights compute.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_generator)
    adapted = PeftModel.from_pretrained(base, out / ADAPTER_FOLDER).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(torch.tensor([prompt])).logits, model(torch.tensor([prompt])).logits, atol=1e-4, rtol=1e-4
        )

    _serves_through_our_app(out)

    # The full-model run, continued, resumes its own step-2 checkpoint (not the LoRA run's step 8).
    run(full.model_copy(update={"max_steps": 3}))
    assert sorted(_history(tmp_path / "runs", "loss")) == [3]
    # Its training time counts both runs' steps, not only the resumed run's (the report quotes it).
    took = json.loads((out / "training.json").read_text())
    assert took["steps"] == 3 and took["resumed_from_step"] == 2
    assert took["train_seconds"] > first["train_seconds"]
    assert not (out / ADAPTER_FOLDER).exists() and read_training_setup(out)["exported"]["weights"] == "full"


def _serves_through_our_app(folder: Path) -> None:
    """The exported folder behind the real Serve app: a steered chat completion over HTTP."""
    import socket

    import requests
    from ray import serve

    from serve.app import AppArgs, bind_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = AppArgs(generator=str(folder), api_key_env=None)
        options = {name: {"ray_actor_options": {"num_cpus": 0}} for name in ("Ingress", "Generator")}
        serve.run(bind_app(args, options), name="lora", route_prefix="/")
        body = {"model": "helpsteer", "messages": [{"role": "user", "content": "Describe France."}]}
        answer = requests.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={**body, "attributes": {"verbosity": 0}, "max_tokens": 4, "temperature": 0},
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        serve.shutdown()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_on_cpu_needs_zero_1_and_says_so(tmp_path, stage):
    values = {
        "data": str(tmp_path),
        "out": str(tmp_path / "sft"),
        "deepspeed": {"precision": "bf16", "zero_stage": stage},
    }
    with pytest.raises(ValueError, match=f"bf16 on CPU .* needs deepspeed.zero_stage: 1 .* not {stage}"):
        TrainSFTConfig.model_validate(values)
    assert TrainSFTConfig.model_validate(values | {"use_gpu": True}).deepspeed.precision == "bf16"


def test_fixed_cut_points_are_checked_and_an_empty_set_keeps_the_old_run_identity(tmp_path):
    from ray_jobs.train_sft import TRAINING_SPEED_ONLY, identity_settings

    values = {"data": str(tmp_path), "out": str(tmp_path / "sft"), "attribute_source": "apm_quantile"}
    with pytest.raises(
        ValueError, match=r"quantile_cuts.verbosity: \[2.0, 1.0, 3.0, 4.0\]; expected 4 ascending"
    ):
        TrainSFTConfig.model_validate(values | {"quantile_cuts": {"verbosity": [2.0, 1.0, 3.0, 4.0]}})
    with pytest.raises(ValueError, match=r"quantile_cuts: \['length'\]; allowed: quality"):
        TrainSFTConfig.model_validate(values | {"quantile_cuts": {"length": [1.0, 2.0, 3.0, 4.0]}})
    plain = identity_settings(TrainSFTConfig.model_validate(values), TRAINING_SPEED_ONLY)
    assert "quantile_cuts" not in plain  # runs from before the option keep their identity
    fixed = TrainSFTConfig.model_validate(values | {"quantile_cuts": {"verbosity": [1.0, 2.0, 3.0, 4.0]}})
    assert identity_settings(fixed, TRAINING_SPEED_ONLY)["quantile_cuts"] == {
        "verbosity": [1.0, 2.0, 3.0, 4.0]
    }


def test_answer_level_at_is_checked_and_whole_keeps_the_old_run_identity(tmp_path):
    from ray_jobs.train_sft import TRAINING_SPEED_ONLY, identity_settings

    values = {"data": str(tmp_path), "out": str(tmp_path / "sft"), "attribute_source": "apm_quantile"}
    with pytest.raises(ValueError, match="answer_level_at 2 needs answer_level"):
        TrainSFTConfig.model_validate(values | {"answer_level_at": 2})
    registers = values | {"answer_level": ["complexity"]}
    with pytest.raises(ValueError, match="answer_level_at 0: a number of sentences"):
        TrainSFTConfig.model_validate(registers | {"answer_level_at": 0})
    with pytest.raises(ValueError, match="answer_level_at"):
        TrainSFTConfig.model_validate(registers | {"answer_level_at": "first"})
    whole = identity_settings(TrainSFTConfig.model_validate(registers), TRAINING_SPEED_ONLY)
    assert "answer_level_at" not in whole  # runs from before the option keep their identity
    at_two = TrainSFTConfig.model_validate(registers | {"answer_level_at": 2})
    assert identity_settings(at_two, TRAINING_SPEED_ONLY)["answer_level_at"] == 2


def test_bf16_with_zero_1_accumulates_gradients_in_fp32(tmp_path):
    """ZeRO-1 bf16 asks DeepSpeed for fp32 gradient accumulation, which selects its BF16_Optimizer."""
    config = TrainSFTConfig.model_validate(
        {
            "data": str(tmp_path),
            "out": str(tmp_path / "sft"),
            "deepspeed": {"precision": "bf16", "zero_stage": 1},
        }
    )
    common = dict(
        micro_batch=2,
        accumulation=4,
        world=1,
        lr=1e-4,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=10,
        schedule="constant",
        grad_clip=1.0,
        use_gpu=False,
    )
    ds = build_config(config.deepspeed, **common)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in build_config(DeepSpeedSettings(zero_stage=1), **common)  # fp32 on CPU

    # What DeepSpeed itself chose from that config, on a real (one-process, CPU) engine.
    chosen = _deepspeed_choice(ds)
    assert chosen["optimizer"] == "BF16_Optimizer", chosen
    assert (chosen["model_dtype"], chosen["grad_accum_dtype"]) == ("torch.bfloat16", "torch.float32"), chosen
    assert chosen["bf16"] and chosen["param_dtype"] == "torch.bfloat16", chosen
    fp32 = _deepspeed_choice(build_config(DeepSpeedSettings(zero_stage=1), **common))
    assert fp32["optimizer"] != "BF16_Optimizer" and fp32["model_dtype"] == "torch.float32", fp32


_ENGINE_SCRIPT = """
import json, sys
import deepspeed, torch
from ray_jobs.deepspeed_engine import init_engine
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
engine = init_engine(model, json.loads(sys.argv[1]))
model_dtype, grad_accum_dtype = engine.get_data_types()
print(json.dumps({
    "optimizer": type(engine.optimizer).__name__,
    "bf16": engine.bfloat16_enabled(),
    "model_dtype": str(model_dtype),
    "grad_accum_dtype": str(grad_accum_dtype),
    "param_dtype": str(next(engine.module.parameters()).dtype),
}))
"""


def _deepspeed_choice(ds_config: dict[str, Any]) -> dict[str, Any]:
    """`deepspeed.initialize` on a tiny model in a fresh one-rank process: what it picked."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT, json.dumps(ds_config)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_repeated_rows_are_trained_that_many_times_an_epoch_and_validated_once(tmp_path, tiny_generator):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpsteer_core.generator import load_generator_tokenizer

    rows = [
        {"prompt": f"Question {i}?", "response": f"Answer {i}.", "style": style, "first_sentences": first}
        | {f"apm_{name}_int": 2 for name in STEERLM.names}
        for i, (style, first) in enumerate([("simple", 1), ("simple", None), ("expert", 1), ("plain", 1)] * 4)
    ]
    data = tmp_path / "relabelled"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "part-000000.parquet")
    register = {"where": {"style": ["simple", "expert"], "first_sentences": [1]}, "times": 3}
    config = _config(tmp_path, tiny_generator, tmp_path, attribute_source="apm", repeat=[register])
    config = config.model_copy(update={"data": str(data), "max_steps": None, "num_workers": 1})
    tokenizer = load_generator_tokenizer(str(tiny_generator))
    once = build_examples(config.model_copy(update={"repeat": []}), tokenizer, str(data))
    stats = SFTStats()
    repeated = build_examples(config, tokenizer, str(data), stats)
    validation = build_examples(config, tokenizer, str(data), training=False)
    assert len(once) == len(validation) == 16
    assert validation == once
    # The 8 one-sentence simple/expert rows three times each, the other 8 once: 32 examples, the
    # repeats identical to their row's example (same attribute line, same tokens).
    assert len(repeated) == 8 * 3 + 8
    assert (stats.examples, stats.repeated_rows, stats.repeated_examples) == (16, 8, 16)
    decoded = [tokenizer.decode(e["input_ids"]) for e in repeated]
    assert (
        sum("Answer 0." in text for text in decoded) == 3
        and sum("Answer 1." in text for text in decoded) == 1
    )
    # An epoch counts the repeats: 32 rows of 2 (micro 1 x accumulation 2 x 1 worker) are 16 steps.
    assert plan(config, [len(e["input_ids"]) for e in repeated])[1:] == (16, 16)


def test_each_source_takes_its_own_attribute_source_so_a_new_apm_changes_only_the_relabelled_one(
    tmp_path, tiny_generator
):
    """Several sources in one AC-SFT run: HelpSteer rows conditioned on their human labels,
    OpenAssistant turns on the APM's. A new APM's predictions change the examples (and the
    pipeline's key) of the relabelled source and leave the human-labelled source's as they were."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpsteer_core.attributes import HELPSTEER_ATTRIBUTES
    from helpsteer_core.config import ConfigError
    from helpsteer_core.generator import load_generator_tokenizer
    from ray_jobs.train_sft import examples_fingerprint

    def write(folder: Path, source: str, apm_value: int) -> str:
        rows = [
            {"prompt": f"{source} question {i}?", "response": f"{source} answer {i}.", "data_source": source}
            | ({name: 1 for name in HELPSTEER_ATTRIBUTES} if source == "helpsteer" else {"quality": 3})
            | {f"apm_{name}_int": apm_value for name in STEERLM.names}
            for i in range(4)
        ]
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "part-000000.parquet")
        return str(folder)

    mapping = {"helpsteer": "human", "oasst": "apm"}
    config = _config(tmp_path, tiny_generator, tmp_path, attribute_source=mapping)
    tokenizer = load_generator_tokenizer(str(tiny_generator))

    def examples(apm_value: int, helpsteer_apm_value: int) -> tuple[list, str]:
        data = [
            write(tmp_path / f"oasst-{apm_value}", "oasst", apm_value),
            write(tmp_path / f"hs-{helpsteer_apm_value}", "helpsteer", helpsteer_apm_value),
        ]
        built = build_examples(config.model_copy(update={"data": data}), tokenizer, data)
        return built, examples_fingerprint(config, data)

    first, key = examples(apm_value=2, helpsteer_apm_value=2)
    second, new_key = examples(apm_value=4, helpsteer_apm_value=4)  # another APM's predictions
    assert len(first) == len(second) == 8
    assert first[4:] == second[4:]  # HelpSteer rows: human labels, whatever the APM says
    assert all(a != b for a, b in zip(first[:4], second[:4], strict=True))  # OpenAssistant: the APM's
    assert new_key != key
    texts = [tokenizer.decode(e["input_ids"]) for e in first]
    assert all("helpfulness:1" in t for t in texts[4:]) and all("quality:2" in t for t in texts[:4])
    # The APM changing only where SFT does not read it (the human-labelled source) changes nothing.
    assert examples(apm_value=2, helpsteer_apm_value=4)[1] == key

    stray = write(tmp_path / "other", "judged", 2)
    with pytest.raises(ConfigError, match=r"source 'judged'.*names \['helpsteer', 'oasst'\]"):
        build_examples(config, tokenizer, [stray])
