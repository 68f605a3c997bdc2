"""Connecting to Ray: join a running cluster when there is one, start a local one otherwise.

Under `ray job submit` RAY_ADDRESS is set and `ray.init()` joins that cluster; from a laptop
shell it starts a local instance. Either way the job's code is the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
from pydantic import BaseModel

from helpsteer_core.attributes import AttributeValueError
from helpsteer_core.config import ConfigError, load_config, resolve_path
from helpsteer_core.outputs import OutputError
from helpsteer_core.readers import SourceError
from ray_jobs import console

log = logging.getLogger(__name__)
T = TypeVar("T")
# Errors in what the user gave (config, paths, data, an `out` that is not the stage's): one line
# and exit status 2. Anything else, a plain ValueError included, is a bug and keeps its traceback.
STAGE_ERRORS = (ConfigError, SourceError, AttributeValueError, OutputError, FileNotFoundError)


def ensure_ray(num_cpus: int | None = None) -> None:
    """`ray.init()` unless this process is already connected.

    RAY_ADDRESS (set by `ray job submit`) wins. Otherwise a local `ray start --head` cluster is
    joined when its GCS answers; a stale record of a cluster that is gone (Ray keeps one in
    /tmp/ray) would make a plain `ray.init()` wait a minute for it, so then a fresh local
    instance starts instead.
    """
    if ray.is_initialized():
        return
    given = os.environ.get("RAY_ADDRESS")
    address = given or _live_local_cluster()
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as error:  # auth, version mismatch, a head going away: Ray's own types
            if given:
                raise
            raise RuntimeError(
                f"ray: could not join the local Ray cluster at {address} (found through Ray's record "
                f"in /tmp/ray, no RAY_ADDRESS set): {error}. To run in a Ray instance of this "
                "process's own, set RAY_ADDRESS=local; to use that cluster, give what it needs "
                "(e.g. RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH for token auth)"
            ) from error
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    resources = ray.cluster_resources()
    log.info("ray: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))


def _live_local_cluster() -> str | None:
    from ray._private.utils import read_ray_address

    recorded = read_ray_address()
    if not recorded:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return recorded
    except (OSError, ValueError):
        log.info("ray: recorded cluster %s does not answer; starting a local instance", recorded)
        return None


def quiet_ray_data() -> None:
    """Ray Data's progress bars only where they are read: on a verbose console (the stages print
    their own progress lines; HELPSTEER_PROGRESS=0 or 1 decides either way)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input and config -> same row order
    ctx.enable_progress_bars = os.environ.get("HELPSTEER_PROGRESS", "0" if console.quiet() else "1") != "0"


def stage_main(
    doc: str | None,
    prog: str,
    config_cls: type[BaseModel],
    run: Callable[[Any], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """`python -m ray_jobs.<stage> --config FILE [--verbose] [dotted.key=value ...]` for every stage.

    Config and input errors print one line naming the file, line and key (or the path) and
    return 2; anything else is a bug or an infrastructure failure and keeps its traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--verbose", action="store_true", help="Ray's and the libraries' output here too")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. tracking.runs_dir=/mnt/runs")
    args = parser.parse_args(argv)
    try:
        config = load_config(config_cls, args.config, args.overrides)
        run_stage(prog.rsplit(".", 1)[-1], run, config, args.verbose)
    except STAGE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_stage(name: str, run: Callable[[Any], Any], config: Any, verbose: bool) -> Any:
    """`run(config)` with the console set up (ray_jobs.console): the log file goes under the
    stage's runs folder (`runs_dir`, or `tracking.runs_dir`); a config without one is verbose."""
    runs = getattr(config, "runs_dir", None) or getattr(getattr(config, "tracking", None), "runs_dir", None)
    with console.stage_console(name, resolve_path(runs or "."), verbose or runs is None):
        return run(config)


def device_for_gpus(gpus: float, cuda_available: bool) -> tuple[str, str]:
    """(device, dtype name) for a task, actor or replica given the GPUs Ray assigned it: cuda and
    bfloat16 when it has one and CUDA sees it, else cpu and float32 (bf16 on CPU costs accuracy
    for little)."""
    if gpus > 0 and cuda_available:
        return "cuda", "bfloat16"
    if gpus > 0:
        log.warning("assigned %s GPU(s) but CUDA sees none: running on CPU", gpus)
    return "cpu", "float32"


def use_assigned_resources() -> tuple[int, str, str]:
    """Inside a Ray task, actor or replica: torch threads = the CPUs Ray assigned (at least 1).
    Returns (threads, device, dtype name), the last two `device_for_gpus` of its GPUs."""
    import torch

    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 0)))
    torch.set_num_threads(threads)
    return threads, *device_for_gpus(float(assigned.get("GPU", 0)), torch.cuda.is_available())


def run_as_task(
    fn: Callable[..., T],
    *args: Any,
    num_cpus: float,
    num_gpus: float = 0,
    here: bool = False,
    pass_device: bool = False,
    **kwargs: Any,
) -> T:
    """`fn(*args, **kwargs)` as one Ray task with these resources; its result (or its exception).

    The stages' model work outside training and generation (evaluating and scoring with the APM,
    the relevance encoder, converting the packaged generator) runs this way, never in the driver:
    a cluster job's driver sits on a head pod sized for planning (8-32 GiB), and a GPU is visible
    only to a task that asks for it. `here`: on the driver's node, for work whose output is a
    node-local path the driver reads next (a model cache folder). `pass_device`: `fn` also gets
    `device=` and `dtype=` (a dtype name), those of the GPUs the task was given
    (`use_assigned_resources`), and runs with as many torch threads as it has CPUs.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": 0}
    if here:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    if pass_device:
        return ray.get(ray.remote(_with_device).options(**options).remote(fn, args, kwargs))
    return ray.get(ray.remote(fn).options(**options).remote(*args, **kwargs))


def _with_device(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    _, device, dtype = use_assigned_resources()
    return fn(*args, device=device, dtype=dtype, **kwargs)


def prepare_generator(name: str) -> None:
    """A packaged generator (`package:...`) is converted to its Hugging Face folder by a task on
    this node (once: later calls find the folder), so that this process can read its tokenizer
    and config without ever loading its weights. Hub ids and folders need nothing."""
    from helpsteer_core.generator import resolve_generator

    if name.startswith("package:"):
        # 0 CPUs: a head node often offers none to tasks, and this one only converts a small model.
        run_as_task(resolve_generator, name, num_cpus=0, here=True)


def fit_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    config: Any,
    storage: Any,
    what: str,
) -> Any:
    """Run a Ray Train `TorchTrainer` for a training stage and return its last checkpoint.

    `config` carries the stage's shared Ray Train fields: num_workers, use_gpu, cpus_per_worker,
    run_name (with `storage`, what a re-run resumes), keep_checkpoints and max_failures.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Quiet console: the workers' training lines reach it through a queue (ray_jobs.console).
    relay = console.Relay() if console.quiet() else None
    if relay is not None:
        loop_config = {**loop_config, "console": relay.queue}
    trainer = TorchTrainer(
        console.relay_worker_logs(train_loop),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if relay is not None:
            relay.close()
    if result.checkpoint is None:
        raise RuntimeError(f"{what} under {storage}/{config.run_name} reported no checkpoint")
    return result
