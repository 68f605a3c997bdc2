"""MLflow tracking for every stage: one run per stage, nested under a pipeline run if any.

The default tracking URI is an absolute sqlite file in the runs folder
(`sqlite:////abs/runs/mlflow.db`) with artifacts beside it, so Ray workers and `helpsteer ui`
find the same database whatever their working directory: right for one machine. On a cluster,
`tracking_uri: http://HEAD:5000` points every stage at an `mlflow server` (docs/operations.md):
the server is then the only process that writes the backend store, and the driver and the rank-0
training worker are HTTP clients. Only the driver (for its stage run) and the rank-0 worker (per-
step metrics, `WorkerMetrics`) call into this module; the worker's writes are retried with backoff
and, if the server stays away, dropped with a warning: a logging failure never stops training.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from pydantic import BaseModel, Field

from helpsteer_core.attributes import AttributeSchema
from helpsteer_core.config import StrictModel, dump_config, resolve_path

log = logging.getLogger(__name__)
HEAD = "{head}"  # in tracking_uri: the driver's node address
ARTIFACT_SIZE_LIMIT = 50 * 2**20  # larger output folders are referenced by path, not copied


class TrackingSettings(StrictModel):
    """Where MLflow runs go and how hard a training worker tries; the pipeline's `tracking:`."""

    # null: the sqlite file runs_dir/mlflow.db (one machine). On a cluster, an `mlflow server`
    # on the head (docs/operations.md), never a sqlite file on shared storage: http://{head}:5000,
    # where {head} becomes the driver's node address (the head, under `ray job submit`).
    tracking_uri: str | None = None
    enabled: bool = True
    # A training worker's metrics write: retried this many times, waiting retry_backoff_s, then
    # twice that, and so on (1 s and 5 retries: up to 31 s), then dropped with a warning.
    retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(1.0, ge=0.0)


class TrackingConfig(TrackingSettings):
    """A stage's MLflow settings: the above plus the runs folder and the experiment."""

    # Folder of the default sqlite database and artifacts; relative to $HELPSTEER_HOME or cwd.
    runs_dir: str = "runs"
    experiment: str = "helpsteer"

    def uri(self) -> str:
        """The URI to log to; resolved on the driver, which hands the result to its workers."""
        if self.tracking_uri and HEAD in self.tracking_uri:
            import ray.util

            return self.tracking_uri.replace(HEAD, ray.util.get_node_ip_address())
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{resolve_path(self.runs_dir) / 'mlflow.db'}"

    def artifact_root(self) -> str:
        return (resolve_path(self.runs_dir) / "mlartifacts").as_uri()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _setup(tracking: TrackingConfig) -> None:
    if not tracking.tracking_uri:
        resolve_path(tracking.runs_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking.uri())
    if mlflow.get_experiment_by_name(tracking.experiment) is None:
        artifact_location = None if tracking.tracking_uri else tracking.artifact_root()
        mlflow.create_experiment(tracking.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(tracking.experiment)


class StageRun:
    """What a stage logs while its MLflow run is open. A disabled run logs nothing."""

    def __init__(self, run: Any | None) -> None:
        self.run = run
        self.run_id: str | None = run.info.run_id if run is not None else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        numeric = {
            k: float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def log_json(self, data: Any, name: str) -> None:
        if self.run is not None:
            mlflow.log_dict(data, name)

    def log_outputs(self, paths: Mapping[str, Path]) -> None:
        """Small outputs are copied as artifacts; every output's path is a tag."""
        if self.run is None:
            return
        for name, path in paths.items():
            mlflow.set_tag(f"output.{name}", str(path))
            if not path.exists():
                continue
            size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            if size > ARTIFACT_SIZE_LIMIT:
                continue
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            else:
                mlflow.log_artifact(str(path))

    def register_folder(self, name: str, folder: Path, description: str, schema_id: str) -> None:
        """A registry version of model `name` that points at `folder` (no copy: models can be
        hundreds of GB; the folder must stay where it is)."""
        if self.run_id is None:
            return
        client = mlflow.MlflowClient()
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description=description)
        version = client.create_model_version(
            name, folder.as_uri(), run_id=self.run_id, tags={"attribute_schema": schema_id}
        )
        log.info("registered %s version %s -> %s", name, version.version, folder)


def _transient(exc: Exception) -> bool:
    """Worth retrying: the server unreachable, overloaded, or a store busy ("database is locked");
    not a request the server rejects as wrong (a bad run id or value stays wrong)."""
    if isinstance(exc, mlflow.exceptions.RestException):
        code = exc.get_http_status_code()
        return code >= 500 or code == 429
    return isinstance(exc, (OSError, mlflow.exceptions.MlflowException))


class WorkerMetrics:
    """Per-step metrics from a training worker into the stage's run (rank 0 only: other ranks
    and disabled tracking get an object that logs nothing).

    A write that fails for a transient reason is retried with exponential backoff; one that
    still fails is dropped with a warning, and training goes on. MLflow's own HTTP retries are
    turned off for this client (they would wait minutes per call); these are bounded by
    `TrackingConfig.retries` and `retry_backoff_s`.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str | None,
        rank: int,
        retries: int = 5,
        retry_backoff_s: float = 1.0,
    ) -> None:
        self.run_id = run_id if rank == 0 else None
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self.dropped = 0  # steps whose metrics never reached the server
        self.client = mlflow.MlflowClient(tracking_uri) if self.run_id else None
        if self.client is not None and tracking_uri.startswith(("http://", "https://")):
            # Read at each request: this worker's calls fail fast and our loop does the waiting.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    @classmethod
    def for_loop(cls, loop_config: Mapping[str, Any], rank: int, tracking: TrackingConfig) -> WorkerMetrics:
        """The worker's writer from a training loop's config (`tracking_uri`, `run_id`)."""
        return cls(
            loop_config["tracking_uri"],
            loop_config["run_id"],
            rank,
            tracking.retries,
            tracking.retry_backoff_s,
        )

    def log(self, metrics: Mapping[str, float], step: int) -> bool:
        """True when the metrics reached the tracking store (or there is nothing to log)."""
        if self.client is None or self.run_id is None:
            return True
        stamp = int(time.time() * 1000)
        finite = [mlflow.entities.Metric(k, v, stamp, step) for k, v in metrics.items() if math.isfinite(v)]
        for attempt in range(self.retries + 1):
            try:
                self.client.log_batch(self.run_id, metrics=finite)
                return True
            except Exception as exc:  # noqa: BLE001 - tracking must never end a training run
                if attempt == self.retries or not _transient(exc):
                    self.dropped += 1
                    log.warning(
                        "mlflow: metrics of step %d dropped after %d attempt(s) (%d step(s) dropped "
                        "so far); training goes on: %s",
                        step,
                        attempt + 1,
                        self.dropped,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    )
                    return False
                time.sleep(self.retry_backoff_s * 2**attempt)
        return False


@functools.cache
def machine_tags() -> dict[str, str]:
    """Where a run's timings were measured: the CPU model, the cores this process may use and the
    GPUs it sees. These describe the machine that opens the run (the driver's); on a cluster the
    workers' nodes are the cluster YAML's. Read once a process. The GPUs' names come from
    nvidia-smi, not torch: naming a device through torch opens a CUDA context (GPU memory) in a
    driver that otherwise never touches the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        models = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = models[0].split(":", 1)[1].strip() if models else cpu
    except OSError:
        pass  # not Linux: the platform's own name
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch  # every stage has it loaded already

    count = torch.cuda.device_count()  # through NVML where it can: no CUDA context
    gpus = "none"
    if count:
        try:
            smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
            names = subprocess.run(smi, capture_output=True, text=True, timeout=30, check=True).stdout
            gpus = ", ".join(names.split("\n")[:count]).strip(", ") or f"{count} CUDA devices"
        except (OSError, subprocess.SubprocessError):
            gpus = f"{count} CUDA devices"
    return {"machine.cpu": cpu, "machine.cpus": str(cores), "machine.gpus": gpus}


@contextmanager
def stage_run(
    stage: str,
    config: BaseModel,
    tracking: TrackingConfig,
    schema: AttributeSchema | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage, nested when a pipeline run is active in this process."""
    if not tracking.enabled:
        yield StageRun(None)
        return
    _setup(tracking)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        run_name=stage, nested=nested, tags={"stage": stage, **machine_tags(), **(tags or {})}
    ) as run:
        params = flatten(config.model_dump(mode="json"))
        # MLflow params are strings of bounded length; lists become their JSON text.
        mlflow.log_params({k: json.dumps(v) if not isinstance(v, str) else v for k, v in params.items()})
        mlflow.log_text(dump_config(config), "config.yaml")
        if schema is not None:
            mlflow.log_dict(schema.to_dict(), "attribute_schema.json")
            mlflow.set_tag("attribute_schema", schema.id)
        log.info("mlflow run %s (%s) in %s", run.info.run_id, stage, tracking.uri())
        yield StageRun(run)


def runs_for(tracking: TrackingConfig, stage: str) -> list[Any]:
    """Finished runs of a stage, newest first (used by tests and the pipeline summary)."""
    mlflow.set_tracking_uri(tracking.uri())
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    return list(
        mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.stage = '{stage}'",
            order_by=["start_time DESC"],
            output_format="list",
        )
    )
