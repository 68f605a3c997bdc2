"""What a stage prints: the project's own lines on the console, Ray's and the libraries' in a log file.

A stage run from `helpsteer <stage>` or `python -m ray_jobs.<stage>` writes its stage lines,
per-step training lines and progress with an ETA to the console, and the closing table to stdout.
Everything else the process and Ray send its way (worker logs forwarded with their `(pid=...)`
prefix, Ray Train's controller and placement-group messages, core_worker lines, Ray Data's
progress, the libraries' download and "Loading weights" bars) goes to
`runs_dir/logs/<stage>-<time>.log`, named on the first line. `--verbose` puts it all on the
console instead, as Ray prints it. Ray's own output is redirected at the file descriptors, since
much of it comes from C++ or from threads that write to stdout and stderr directly.

Training lines are logged inside the Ray Train workers; in the quiet mode `fit_trainer` relays
the workers' `helpsteer.*` records to the driver through a `ray.util.queue.Queue`, where they are
printed like the driver's own lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# The loggers the console shows in the quiet mode: the stages' and this package's.
PROJECT_LOGGERS = ("helpsteer", "ray_jobs")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_state: dict[str, Any] = {"out": None, "log": None}


def console_out() -> IO[str]:
    """Where the closing table goes: the terminal's stdout, also while Ray's output is redirected."""
    return _state["out"] or sys.stdout


def log_file() -> Path | None:
    """The log file of the running stage in the quiet mode; None when verbose (or not a CLI run)."""
    return _state["log"]


def quiet() -> bool:
    return _state["log"] is not None


@contextmanager
def stage_console(name: str, runs_dir: Path, verbose: bool) -> Iterator[Path | None]:
    """Set up the console for one CLI run of stage `name`; yields the log file (None if verbose).

    Quiet: file descriptors 1 and 2 point at the log file while the stage runs, the console
    keeps copies of them for the project's lines. On the way out a Ray this run started is shut
    down first (its exit chatter goes to the file too), then the terminal is given back, so an
    error or traceback raised out of the stage prints there.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        yield None
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # forwarded worker lines without colour codes
    folder = runs_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = open(os.dup(1), "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    err = open(os.dup(2), "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    err.write(f"log: {path} (Ray and library output; --verbose prints it here)\n")
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)

    root = logging.getLogger()
    before = root.handlers[:], root.level
    to_file = logging.FileHandler(path, encoding="utf-8")  # appends, beside what fds 1 and 2 write
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    to_console = logging.StreamHandler(err)
    to_console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    to_console.addFilter(lambda record: record.name.startswith(PROJECT_LOGGERS))
    root.handlers = [to_file, to_console]
    root.setLevel(logging.INFO)
    was_running = _ray_running()
    _state.update(out=out, log=path)
    try:
        yield path
    except BaseException:
        traceback.print_exc()  # into the log file too: the terminal gets it once it is given back
        raise
    finally:
        if not was_running and _ray_running():
            import ray

            ray.shutdown()
        _state.update(out=None, log=None)
        root.handlers, root.level = before
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        err.close()


def _ray_running() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return bool(ray.is_initialized())


class Progress:
    """Progress lines with a rate and an ETA, at most one every `every` seconds (and the last).

    For work the driver sees arrive (generation, relabel parts); training steps carry their own
    ETA (`eta`), since the workers log them.
    """

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str, every: float = 10.0) -> None:
        self.log, self.what, self.total, self.unit, self.every = log, what, total, unit, every
        self.done = 0
        self.started = self.shown = time.monotonic()
        # The pace is measured from the first arrival: the wait before it (a model loading, actors
        # starting) happens once and would inflate every estimate.
        self.first: tuple[float, int] | None = None

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if now - self.shown < self.every and self.done < self.total:
            return
        self.shown = now
        elapsed = now - self.started
        since, at_first = self.first
        if self.done >= self.total:
            left = "done"
        elif self.done > at_first and now > since:
            left = f"eta {_duration((self.total - self.done) * (now - since) / (self.done - at_first))}"
        else:
            left = "eta after the next arrival"
        self.log.info(
            "%s: %d/%d %s (%d%%), %s elapsed, %s",
            self.what,
            self.done,
            self.total,
            self.unit,
            100 * self.done // max(self.total, 1),
            _duration(elapsed),
            left,
        )


def eta(started: float, first: int, done: int, total: int) -> str:
    """'eta 3m10s' for step `done` of `total`, from the time per step since step `first` began
    (at `started`, a time.monotonic() reading): a resumed run counts only its own steps."""
    steps = done - first
    if steps <= 0 or done >= total:
        return "eta 0s"
    return f"eta {_duration((time.monotonic() - started) / steps * (total - done))}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def relay_worker_logs(loop: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """A Ray Train loop that sends its `helpsteer.*` records to `config["console"]` (a
    ray.util.queue.Queue) when there is one; see `Relay`."""

    def relayed(config: dict[str, Any]) -> None:
        queue = config.pop("console", None)
        if queue is None:
            loop(config)
            return
        handler = logging.handlers.QueueHandler(queue)
        project = logging.getLogger("helpsteer")
        project.setLevel(logging.INFO)
        project.addHandler(handler)
        try:
            loop(config)
        finally:
            project.removeHandler(handler)

    return relayed


class Relay:
    """Driver side of `relay_worker_logs`: a queue actor and a thread that logs what arrives as
    if it were logged here (the console shows it; the log file keeps it). Off when verbose, where
    Ray forwards the workers' lines itself."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})  # takes no CPU from the training workers
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="helpsteer-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                record = self.queue.get(timeout=0.5)
            except Empty:
                if self.stop.is_set():
                    return
                continue
            logging.getLogger(record.name).handle(record)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.queue.shutdown()
