"""Benchmark: the whole pipeline's wall time and peak memory per stage, in one table.

    .venv/bin/python bench/pipeline.py [--config configs/local.yaml] [--runs DIR] [key=value ...]

Runs `ray_jobs.pipeline` in this process with a fresh runs folder (a temporary one unless
--runs is given) on a private local Ray, so every Ray process (GCS, raylet, workers, Train and
Serve actors) is a descendant of this one. A sampler thread reads the resident memory (RSS) of
the whole process tree every 0.5 s and books it to the stage that is running. Per stage it
reports the wall time, the peak of the tree's summed RSS (an upper bound: pages shared between
processes, such as the torch libraries, count once per process) and the largest single process
with its command name. Then it runs the pipeline a second time with the same config, which must
skip every stage, and reports that time too. The target is the issue's: the embedded default in
under 20 minutes on a 2-core machine from a warm install; the ratio to it is printed.
`key=value` overrides go to the pipeline config (e.g. `sft.max_steps=10` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 20 * 60
SETUP = "setup"  # synthetic data, Ray start-up: before the first stage


class TreeSampler(threading.Thread):
    """Peak summed and single-process RSS of this process and its descendants, per phase."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = SETUP
        self.total: dict[str, int] = defaultdict(int)
        self.single: dict[str, tuple[int, str]] = defaultdict(lambda: (0, ""))
        self._halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.wait(self.interval):
            phase, total = self.phase, 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    rss, name = process.memory_info().rss, process.name()
                except psutil.Error:  # it ended between the listing and the read
                    continue
                total += rss
                if rss > self.single[phase][0]:
                    self.single[phase] = (rss, name)
            self.total[phase] = max(self.total[phase], total)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--runs", type=Path, help="runs folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument("overrides", nargs="*", help="pipeline config overrides, dotted.key=value")
    args = parser.parse_args()
    os.environ["RAY_ADDRESS"] = "local"  # a private instance: its processes are our descendants
    os.environ.setdefault("HELPSTEER_PROGRESS", "0")

    import ray

    from helpsteer_core.config import load_config
    from ray_jobs.pipeline import PipelineConfig, run

    runs = args.runs or Path(tempfile.mkdtemp(prefix="bench-pipeline-")) / "runs"
    config = load_config(PipelineConfig, args.config, [*args.overrides, f"runs_dir={runs}"])
    sampler = TreeSampler()
    ran: list[str] = []

    def on_stage(stage: str) -> None:
        ran.append(stage)
        sampler.phase = stage

    sampler.start()
    t0 = time.perf_counter()
    summary = run(config, on_stage=on_stage)
    first_run = time.perf_counter() - t0
    sampler.stop()
    rerun: list[str] = []
    t0 = time.perf_counter()
    run(config, on_stage=rerun.append)
    second_run = time.perf_counter() - t0
    ray.shutdown()

    walls = {s: summary[s]["wall_s"] for s in ran}
    walls = {SETUP: first_run - sum(walls.values())} | walls
    rows = []
    for stage, wall in walls.items():
        rss, name = sampler.single[stage]
        rows.append(
            {
                "stage": stage,
                "wall_s": round(wall, 1),
                "peak_tree_rss_mb": round(sampler.total[stage] / 2**20),
                "peak_process_rss_mb": round(rss / 2**20),
                "peak_process": name,
            }
        )
    print(f"\npipeline benchmark: {args.config} {' '.join(args.overrides)}; runs in {runs}")
    print(f"{'stage':<10} {'wall':>9} {'peak RSS, tree':>15} {'peak RSS, one process':>22}")
    for r in rows:
        print(
            f"{r['stage']:<10} {r['wall_s']:>7.1f} s {r['peak_tree_rss_mb']:>12,} MB "
            f"{r['peak_process_rss_mb']:>10,} MB ({r['peak_process']})"
        )
    minutes, ratio = first_run / 60, first_run / TARGET_S
    print(f"{'total':<10} {first_run:>7.1f} s   ({minutes:.1f} min; {ratio:.2f}x the 20-min target)")
    print(f"second run, same config: {second_run:.1f} s; stages run again: {', '.join(rerun) or 'none'}")
    if args.json:
        args.json.write_text(
            json.dumps({"stages": rows, "total_s": first_run, "second_run_s": second_run}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
