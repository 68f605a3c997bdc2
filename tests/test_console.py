"""What a user sees: the project's stage lines, progress with an ETA and the closing table on the
console; Ray's internals in the log file named on the first line, or on the console with --verbose."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPSTEER = str(Path(sys.executable).parent / "helpsteer")
# The Done-when line of issue 14 item 9, plus any forwarded worker line (`(RayTrainWorker pid=1)`).
RAY_NOISE = re.compile(r"PlacementGroupCleaner|core_worker|\(pid=|pid=\d+[,)]")
LOG_LINE = re.compile(r"^log: (\S+) \(Ray and library output", re.MULTILINE)


def _log_file(console: str) -> Path:
    found = LOG_LINE.search(console)
    assert found, console[:2000]
    return Path(found.group(1))


def test_quiet_console_sends_what_is_not_the_projects_to_the_log_file(tmp_path):
    """C-level writes to fd 2, prints, other libraries' loggers: the file; project lines and the
    table: the console; an error raised out of the stage: the console once the terminal is back."""
    script = (
        "import logging, os, sys\n"
        "from pathlib import Path\n"
        "from ray_jobs.console import Progress, console_out, stage_console\n"
        f"with stage_console('stage', Path({str(tmp_path)!r}), False):\n"
        "    os.system('echo \"[core_worker.cc:1] C-level line\" >&2')\n"
        "    print('(pid=1) a forwarded worker line')\n"
        "    logging.getLogger('ray.train').warning('PlacementGroupCleaner says')\n"
        "    progress = Progress(logging.getLogger('helpsteer.stage'), 'generate', 2, 'answers', every=0)\n"
        "    progress.advance(); progress.advance()\n"
        "    print('the table', file=console_out())\n"
        "    raise SystemExit('stage failed: reason')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    console = done.stdout + done.stderr
    assert done.returncode == 1 and "stage failed: reason" in done.stderr
    assert not RAY_NOISE.search(console), console
    assert "the table" in done.stdout
    assert re.search(r"generate: 1/2 answers \(50%\), \d+s elapsed, eta after the next arrival", done.stderr)
    assert "generate: 2/2 answers (100%)" in done.stderr
    log = _log_file(done.stderr)
    assert log.parent == tmp_path / "logs" and log.name.startswith("stage-")
    text = log.read_text()
    for line in ("[core_worker.cc:1] C-level", "(pid=1) a forwarded worker line", "PlacementGroupCleaner"):
        assert line in text
    assert "generate: 2/2 answers" in text  # the project's lines are in the file too


def _tiny_pipeline(runs: Path, tiny_backbone: Path, tiny_generator: Path) -> list[str]:
    """`helpsteer run` on 160 synthetic rows with the tiny models: every stage, in a minute or two."""
    settings = [
        f"runs_dir={runs}",
        "synthetic.rows=160",
        f"apm.apm.backbone={tiny_backbone}",
        "apm.max_steps=3",
        "apm.eval_every=3",
        "relabel.rows_per_unit=50",
        "data=null",  # the built-in HelpSteer-style source alone: AC-SFT trains on its rows
        "answers=null",
        "sft.repeat=[]",  # the profile repeats answer rows by style; the filter's rows have none
        f"sft.generator={tiny_generator}",
        "sft.attribute_source=prefer_human",
        "sft.examples.max_length=192",
        "sft.max_steps=3",
        "sft.checkpoint_every=3",
        "sft.eval_every=3",
        "evaluate.prompts=2",
        "evaluate.attribute_prompts={}",
        "evaluate.attributes=[verbosity]",
        "evaluate.max_new_tokens=8",
        "evaluate.mt_bench_max_new_tokens=4",
        "evaluate.real_relevance_prompts=2",
        "evaluate.real_attribute_prompts={verbosity: 1}",
    ]
    return ["run", "--config", str(REPO / "configs" / "local.yaml")] + [
        word for s in settings for word in ("--set", s)
    ]


@pytest.mark.slow
def test_pipeline_console_shows_every_stage_and_its_progress_and_no_ray_internals(
    ray_head, tiny_backbone, tiny_generator, tmp_path
):
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    runs = tmp_path / "runs"
    done = subprocess.run(
        [HELPSTEER, *_tiny_pipeline(runs, tiny_backbone, tiny_generator)],
        cwd=REPO,  # the profile's real prompt files are relative to the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    assert not RAY_NOISE.search(console), RAY_NOISE.findall(console)[:5]
    for stage in ("filter", "train_apm", "relabel", "train_sft", "evaluate"):
        assert f"pipeline: running {stage}" in console
    # Training steps come from the Ray Train workers, relayed to the driver, with an ETA.
    assert re.search(r"apm step 3/3 loss \S+ .* eta \d+s", console), console
    assert re.search(r"sft step 3/3 loss \S+ .* eta \d+s", console), console
    assert re.search(r"relabel: \d+/\d+ parts of 50 rows \(100%\)", console)
    assert re.search(r"generate \(\S+\): \d+/\d+ answers \(100%\)", console)
    assert "helpsteer pipeline" in done.stdout and "MLflow: helpsteer ui" in done.stdout
    log = _log_file(done.stderr)
    assert log.parent == runs / "logs" and log.name.startswith("pipeline-")
    assert f"output: {log}" in done.stdout
    text = log.read_text()
    assert re.search(r"\(RayTrainWorker pid=\d+", text)  # the workers' own output, forwarded by Ray


@pytest.mark.slow
def test_verbose_puts_ray_output_on_the_console(ray_head, tiny_backbone, synthetic_filtered, tmp_path):
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    settings = [
        f"apm.backbone={tiny_backbone}",
        "num_workers=1",
        "max_steps=2",
        "eval_every=2",
        f"storage={tmp_path / 'ray_train'}",
        "tracking.runs_dir=runs",
    ]
    done = subprocess.run(
        [HELPSTEER, "train-apm", "--data", str(synthetic_filtered), "--out", "apm", "--verbose"]
        + [word for s in settings for word in ("--set", s)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    assert re.search(r"\(RayTrainWorker pid=\d+\).*apm step 2/2", console), console[-4000:]
    assert not LOG_LINE.search(console) and not (tmp_path / "runs" / "logs").exists()


def test_progress_eta_leaves_out_the_wait_before_the_first_arrival(monkeypatch, caplog):
    """Generation's first batch arrives after the model loads: the ETA is the pace after it,
    not the load time spread over the rest (a 2-minute load once read 'eta 9h40m')."""
    import logging

    from ray_jobs import console

    clock = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    progress = console.Progress(logging.getLogger("helpsteer.test"), "generate", 250, "answers", every=0)
    with caplog.at_level(logging.INFO, logger="helpsteer.test"):
        clock[0] += 120  # loading the model
        progress.advance(50)
        clock[0] += 10  # then 50 answers every 10 s
        progress.advance(50)
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "generate: 50/250 answers (20%), 2m00s elapsed, eta after the next arrival"
    assert second == "generate: 100/250 answers (40%), 2m10s elapsed, eta 30s"
