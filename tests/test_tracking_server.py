"""MLflow at cluster scale, against a real `mlflow server` on a local port (real HTTP): a stage run
and a worker's per-step metrics reach the server's backend store and artifact destination, a
worker's write waits out a server that is down for a while, and one that stays down is dropped
with a warning instead of ending training."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import MlflowServer, _free_port

from helpsteer_core.config import StrictModel
from ray_jobs.pipeline import PipelineConfig, stage_tracking
from ray_jobs.tracking import TrackingConfig, WorkerMetrics, stage_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The session's server (conftest), with MLflow's own HTTP retries off as WorkerMetrics sets them."""
    # WorkerMetrics turns MLflow's own HTTP retries off in its process; keep that to this module.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield mlflow_server
    finally:
        mlflow.set_tracking_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Stage(StrictModel):
    data: str = "unit"


def test_stage_and_worker_log_over_http_to_the_servers_store(server: MlflowServer, tmp_path: Path, caplog):
    runs = tmp_path / "runs"
    tracking = TrackingConfig(runs_dir=str(runs), tracking_uri=server.url, experiment="cluster")
    report = tmp_path / "stats.json"
    report.write_text('{"rows": 3}\n')
    with stage_run("filter_data", _Stage(), tracking) as tracked:
        tracked.log_metrics({"input_rows": 3})
        tracked.log_outputs({"stats.json": report})
        worker = WorkerMetrics(tracking.uri(), tracked.run_id, rank=0, retries=2, retry_backoff_s=0.1)
        for step in (1, 2):
            assert worker.log({"loss": 1.0 / step, "lr": 5e-6}, step)
        # A request the server rejects as wrong is not retried, and does not raise either.
        wrong = WorkerMetrics(tracking.uri(), "0" * 32, rank=0, retries=5, retry_backoff_s=10.0)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ray_jobs.tracking"):
            assert not wrong.log({"loss": 1.0}, 1)
        assert time.monotonic() - started < 10 and wrong.dropped == 1
    client = mlflow.MlflowClient(server.url)
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["input_rows"] == 3
    assert [m.value for m in client.get_metric_history(tracked.run_id, "loss")] == [1.0, 0.5]
    # The server alone wrote its backend store and artifact destination; nothing went to runs_dir.
    assert server.backend.is_file() and not (runs / "mlflow.db").exists()
    # (the session's server also holds other tests' runs: this run's artifacts are under its id)
    mine = [p.name for p in server.artifacts.rglob("stats.json") if tracked.run_id in p.parts]
    assert mine == ["stats.json"]
    assert "dropped after 1 attempt(s)" in caplog.text


def test_a_server_that_is_not_there_never_stops_training(caplog, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens here: connection refused, retried
    worker = WorkerMetrics(url, "0" * 32, rank=0, retries=3, retry_backoff_s=0.1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ray_jobs.tracking"):
        outcomes = [worker.log({"loss": 1.0}, step) for step in (1, 2)]  # the training loop goes on
    assert outcomes == [False, False] and worker.dropped == 2
    assert time.monotonic() - started < 30  # bounded: 0.1 + 0.2 + 0.4 s of waiting per step
    assert "metrics of step 2 dropped after 4 attempt(s) (2 step(s) dropped so far)" in caplog.text


def test_pipeline_tracking_section_reaches_every_stage(tmp_path: Path):
    config = PipelineConfig.model_validate(
        {"runs_dir": str(tmp_path), "tracking": {"tracking_uri": "http://mlflow.internal:5000", "retries": 2}}
    )
    tracking = stage_tracking(config, tmp_path)
    assert tracking.uri() == "http://mlflow.internal:5000" and tracking.retries == 2
    assert str(tmp_path) == tracking.runs_dir and tracking.experiment == "helpsteer"
    head = stage_tracking(
        config.model_copy(
            update={"tracking": config.tracking.model_copy(update={"tracking_uri": "http://{head}:5000"})}
        ),
        tmp_path,
    ).uri()
    assert re.fullmatch(r"http://[0-9a-f.:]+:5000", head), head  # the driver's node address
    with pytest.raises(ValueError, match="tracking_url"):
        PipelineConfig.model_validate({"tracking": {"tracking_url": "http://x"}})


def test_worker_write_waits_out_a_server_restart(server: MlflowServer):
    client = mlflow.MlflowClient(server.url)
    run_id = client.create_run(client.create_experiment("restart")).info.run_id
    server.stop()
    # The server comes back a little later on the same port and store; the worker keeps trying.
    restart = threading.Timer(1.0, server.start)
    restart.start()
    worker = WorkerMetrics(server.url, run_id, rank=0, retries=10, retry_backoff_s=1.0)
    try:
        assert worker.log({"loss": 0.25}, 7), "the write was dropped although the server came back"
    finally:
        restart.join()
    server.wait()
    history = mlflow.MlflowClient(server.url).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(7, 0.25)] and worker.dropped == 0
