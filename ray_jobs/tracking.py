"""MLflow tracking for every stage: one run per stage, nested under a pipeline run if any.

The default tracking URI is an absolute sqlite file in the runs folder
(`sqlite:////abs/runs/mlflow.db`) with artifacts beside it, so Ray workers and `helpsteer ui`
find the same database whatever their working directory. Only rank 0 (the driver for data
stages) ever calls into this module.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from pydantic import BaseModel

from helpsteer_core.attributes import AttributeSchema
from helpsteer_core.config import StrictModel, dump_config, resolve_path

log = logging.getLogger(__name__)
ARTIFACT_SIZE_LIMIT = 50 * 2**20  # larger output folders are referenced by path, not copied


class TrackingConfig(StrictModel):
    """Where MLflow runs go."""

    # Folder of the default sqlite database and artifacts; relative to $HELPSTEER_HOME or cwd.
    runs_dir: str = "runs"
    # Overrides the default, e.g. http://mlflow.internal:5000 or sqlite:////shared/mlflow.db.
    tracking_uri: str | None = None
    experiment: str = "helpsteer"
    enabled: bool = True

    def uri(self) -> str:
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


class WorkerMetrics:
    """Per-step metrics from a training worker into the stage's run (rank 0 only: other ranks
    and disabled tracking get an object that logs nothing)."""

    def __init__(self, tracking_uri: str, run_id: str | None, rank: int) -> None:
        self.run_id = run_id if rank == 0 else None
        self.client = mlflow.MlflowClient(tracking_uri) if self.run_id else None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.client is None or self.run_id is None:
            return
        stamp = int(time.time() * 1000)
        finite = [mlflow.entities.Metric(k, v, stamp, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=finite)


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
    with mlflow.start_run(run_name=stage, nested=nested, tags={"stage": stage, **(tags or {})}) as run:
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
