"""Shared fixtures. Tests that need Ray share one local head, started the way users start one
(`ray start --head`, token authentication on), so the in-process tests and the `ray job submit`
end-to-end test exercise the same cluster setup."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HELPSTEER2_SAMPLE = SHARED / "data" / "helpsteer2" / "train_rows_001_060.jsonl"

# Token authentication is decided when Ray's config is first loaded in this process, so the mode
# and the token must be in the environment before any test module imports ray.
_TOKEN = Path(tempfile.mkdtemp(prefix="helpsteer-ray-auth-")) / "auth_token"
_TOKEN.write_text(secrets.token_hex(32))
_TOKEN.chmod(0o600)
os.environ.update(
    RAY_AUTH_MODE="token",
    RAY_AUTH_TOKEN_PATH=str(_TOKEN),
    RAY_USAGE_STATS_ENABLED="0",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
)
os.environ.pop("RAY_ADDRESS", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RayHead:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what `ray job submit` and drivers need: auth mode, token, PATH


@pytest.fixture(scope="session")
def helpsteer2_sample() -> Path:
    if not HELPSTEER2_SAMPLE.is_file():
        pytest.skip(f"HelpSteer2 sample not found at {HELPSTEER2_SAMPLE} (../shared/data is absent)")
    return HELPSTEER2_SAMPLE


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A `ray start --head` cluster with token auth, and this process connected to it."""
    import ray

    env = with_venv_path(dict(os.environ))
    with ray_start_head(env) as (gcs, dashboard):
        try:
            os.environ["RAY_ADDRESS"] = gcs  # stages call ensure_ray(), which joins this cluster
            ray.init(address=gcs, log_to_driver=False)
            yield RayHead(gcs, dashboard, {**env, "RAY_ADDRESS": dashboard})
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)


def with_venv_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this venv's bin first on PATH: a head's workers and job drivers run its Python."""
    return env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


@contextmanager
def ray_start_head(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """`ray start --head` with `env` (two CPUs, a dashboard, every port free): its GCS address and
    dashboard URL while inside; stopped on the way out."""
    port, dash_port = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # --block keeps the head in the foreground of this one process, so stopping it stops only
    # this cluster (`ray stop` would kill every Ray process on the machine).
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            # Every port of its own, so a second Ray on this machine (a developer's) cannot take
            # the head's agent port and leave jobs with "no available agent".
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=with_venv_path(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_for_dashboard(dashboard, head)
        yield f"127.0.0.1:{port}", dashboard
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with status {head.returncode}")
        if _answers(url):
            return
        time.sleep(1)
    raise RuntimeError(f"Ray dashboard at {url} did not come up in {timeout}s")


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered, with an auth error
    except Exception:  # noqa: BLE001 - not listening yet
        return False
    return True


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT built from config with the MiniLM tokenizer: real mechanics, seconds to train."""
    from transformers import BertConfig, BertModel

    from helpsteer_core.model_sources import MINILM, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(MINILM)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_filtered(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 synthetic rows through the filter stage: train/ and validation/ Parquet."""
    from helpsteer_core.synthetic import write_synthetic
    from ray_jobs.filter_data import FilterStageConfig
    from ray_jobs.filter_data import run as run_filter

    root = tmp_path_factory.mktemp("synthetic-filtered")
    write_synthetic(root / "data", rows=240, seed=4)
    run_filter(
        FilterStageConfig.model_validate(
            {
                "data": str(root / "data"),
                "out": str(root / "filtered"),
                "split": {"validation_fraction": 0.25},
                "tracking": {"runs_dir": str(root / "runs")},
            }
        )
    )
    return root / "filtered"


@dataclass(frozen=True)
class TrainedAPM:
    model: Path
    runs: Path
    storage: Path
    run_name: str
    data: Path
    driver_loads: list[str] = field(default_factory=list)  # models its driver (this process) loaded


@contextmanager
def model_loads_here() -> Iterator[list[str]]:
    """Every model whose weights this process loads while inside: Hugging Face `from_pretrained`
    of any model class (the APM's backbone and the generators go through it) and the packaged
    generator's GGUF conversion. A spy that calls through: what it watches runs for real. A stage
    run in this process is its own driver, and a driver must load none (model work runs in Ray
    workers and tasks)."""
    import transformers

    from helpsteer_core import generator

    loads: list[str] = []
    load, convert = transformers.PreTrainedModel.from_pretrained.__func__, generator.convert_gguf

    def counted_load(cls: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(f"{cls.__name__}.from_pretrained({source})")
        return load(cls, source, *args, **kwargs)

    def counted_convert(gguf: Any, folder: Any) -> Any:
        loads.append(f"convert_gguf({gguf})")
        return convert(gguf, folder)

    transformers.PreTrainedModel.from_pretrained = classmethod(counted_load)  # type: ignore[method-assign]
    generator.convert_gguf = counted_convert
    try:
        yield loads
    finally:
        transformers.PreTrainedModel.from_pretrained = classmethod(load)  # type: ignore[method-assign]
        generator.convert_gguf = convert


@pytest.fixture(scope="session")
def trained_apm(
    ray_head: RayHead, tiny_backbone: Path, synthetic_filtered: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedAPM:
    """The APM stage run once with 2 DDP workers on the tiny backbone (6 steps, 2 checkpoints)."""
    from ray_jobs.train_apm import TrainAPMConfig
    from ray_jobs.train_apm import run as run_train

    root = tmp_path_factory.mktemp("apm")
    trained = TrainedAPM(root / "apm", root / "runs", root / "ray_train", "tiny-apm", synthetic_filtered)
    with model_loads_here() as loads:
        run_train(
            TrainAPMConfig.model_validate(
                {
                    "data": str(synthetic_filtered),
                    "out": str(trained.model),
                    "apm": {"backbone": str(tiny_backbone)},
                    "num_workers": 2,
                    "batch_size": 8,
                    "max_steps": 6,
                    "eval_every": 3,
                    "checkpoint_every": 3,
                    "lr": 1e-3,
                    "run_name": trained.run_name,
                    "storage": str(trained.storage),
                    "tracking": {"runs_dir": str(trained.runs)},
                }
            )
        )
    trained.driver_loads.extend(loads)
    return trained


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama built from config with SmolLM2's tokenizer and chat template, saved as a
    Hugging Face folder: the generator stages' mechanics in seconds."""
    from helpsteer_core.generator import SMOLLM2, load_generator_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_generator_tokenizer(SMOLLM2)
    model = tiny_llama(vocab_size=len(tokenizer), max_position=1024)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_base() -> Any:
    """The packaged SmolLM2-135M-Instruct's tokenizer (converted from its GGUF once, then cached);
    tests that change it take a copy."""
    from helpsteer_core.generator import SMOLLM2, GeneratorSourceError, load_generator_tokenizer

    try:
        return load_generator_tokenizer(SMOLLM2)
    except GeneratorSourceError as exc:  # the package is installed with --no-deps, outside pyproject
        pytest.skip(str(exc))


class MlflowServer:
    """`mlflow server` as operations.md launches it: a backend store and an artifacts destination.

    It listens on this machine's node address, the one Ray reports and `{head}` in a stage's
    `tracking_uri` becomes under `ray job submit` (not loopback), and allows only that Host header.
    """

    def __init__(self, root: Path, port: int) -> None:
        import ray.util

        self.root, self.port = root, port
        self.host = ray.util.get_node_ip_address()
        self.url = f"http://{self.host}:{port}"
        self.backend = root / "mlflow.db"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [
                mlflow_bin,
                "server",
                f"--host={self.host}",
                f"--port={self.port}",
                f"--allowed-hosts={self.host}:*",
                "--workers=1",
                f"--backend-store-uri=sqlite:///{self.backend}",
                f"--artifacts-destination={self.artifacts}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its workers go with it when the group is stopped
        )

    def wait(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "mlflow server exited"
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server on {self.url} did not answer in {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One `mlflow server` for the session (it takes minutes to start on a loaded 2-core machine);
    a test that stops it starts it again before it ends."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), _free_port())
    server.start()
    try:
        server.wait()
        yield server
    finally:
        server.stop()
