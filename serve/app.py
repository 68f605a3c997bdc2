"""The Serve application: typed builder arguments, the app builder, and the config-file launcher.

    serve run serve/config.yaml                       # Ray Serve's CLI (import_path serve.app:build_app)
    helpsteer serve --generator runs/sft --apm runs/apm  # the same config, checked strictly first

`build_app(AppArgs)` binds three deployments, composed through handles:

    Ingress (FastAPI, serve.api) --> Generator (serve.deployments, or vLLM via serve.vllm on GPUs)
                                 \-> APM       (serve.deployments; optional)

Ray Serve validates builder args with the annotated pydantic model but ignores unknown keys in
the rest of a config file, so `check_config` also walks the whole file for keys Ray would drop.
The API key never appears in a config: `api_key_env` names the environment variable that holds
it, read by the ingress replica (set it where Ray starts, or from a Kubernetes Secret). Serving
beyond loopback without a key is refused (`check_exposure`) unless the args say
`allow_unauthenticated: true`: by `helpsteer serve` before Ray starts, and by the ingress replica
itself, wherever the app was built (`serve run`, a RayService), so that it never starts open by
accident.
"""

# No `from __future__ import annotations` here: Ray Serve reads build_app's annotation at run time
# to turn the config's args into AppArgs, and a string annotation would hand it a plain dict.

import importlib.util
import ipaddress
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from helpsteer_core.config import ConfigError, StrictModel, apply_overrides, resolve_path
from serve.protocol import LimitArgs, model_in
from serve.reward import RewardArgs

log = logging.getLogger("ray.serve")
DEPLOYMENTS = ("Ingress", "Generator", "APM")
CONFIG = Path(__file__).with_name("config.yaml")


class BatchArgs(StrictModel):
    """`@serve.batch` settings of one model deployment; enabled false = batches of one."""

    enabled: bool = True
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)


class VLLMArgs(StrictModel):
    """The vLLM engine's sizing (`engine: vllm`): Ray Serve LLM's `LLMConfig` is built from it
    (`serve.vllm.llm_config`). A replica's engine workers take tensor_parallel_size x
    pipeline_parallel_size GPUs, one per placement-group bundle; the Generator entry of a config's
    `deployments:` does not apply (the LLMServer deployment replaces the Generator)."""

    tensor_parallel_size: int = Field(default=1, ge=1)  # GPUs one model is split over (within a node)
    pipeline_parallel_size: int = Field(default=1, ge=1)  # stages over nodes; 1 on one node
    accelerator_type: str | None = None  # e.g. H100, A100-80G: replicas go only to such GPUs
    cpus_per_worker: float = Field(default=1, gt=0)  # CPUs beside each engine worker's GPU
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1)  # sequences batched at once (vLLM's default)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: int = Field(default=16, ge=1)
    max_ongoing_requests: int = Field(default=64, ge=1)

    def model_post_init(self, _: Any) -> None:
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"vllm: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class AppArgs(StrictModel):
    """The application's arguments: `args:` in serve/config.yaml and the RayService."""

    # An AC-SFT output folder (train_sft): Hugging Face files + sft_config.yaml + attribute_schema.json.
    generator: str
    # A trained APM folder (train_apm); null serves without /v1/score and best-of steering.
    apm: str | None = None
    model_name: str = "helpsteer"  # the `model` id clients send and /v1/models lists
    # Whose defaults fill the attributes a request leaves out: helpsteer (all 4, toxicity, humor,
    # creativity 0) or helpsteer2 (the HelpSteer five at 4, complexity and verbosity 2).
    defaults: Literal["helpsteer", "helpsteer2"] = "helpsteer2"
    default_temperature: float = Field(default=1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    # transformers: serve.deployments.Generator (CPU or GPU); vllm: Ray Serve LLM (GPU, needs vllm);
    # auto: vllm when it is installed and the cluster has GPUs, else transformers.
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    vllm: VLLMArgs = VLLMArgs()  # the vLLM engine's GPUs and replicas (used when the engine is vllm)
    limits: LimitArgs = LimitArgs()
    generator_batching: BatchArgs = BatchArgs()
    apm_batching: BatchArgs = BatchArgs(max_batch_size=32)
    api_key_env: str | None = "HELPSTEER_API_KEY"  # null: never ask for a key
    # POST /get_reward (OpenRLHF's remote reward model; needs the APM): weights and actor template.
    reward: RewardArgs = RewardArgs()
    # Beyond loopback the app refuses to start without a key; true serves openly on purpose (behind
    # an authenticating proxy, say).
    allow_unauthenticated: bool = False


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from elsewhere
        return False


def check_exposure(
    host: str, api_key_env: str | None, allow_unauthenticated: bool, environ: Mapping[str, str], where: str
) -> str | None:
    """The API key the app will ask for (None: none); raise if it would listen beyond loopback
    on `host` without one and `allow_unauthenticated` is not set."""
    key = environ.get(api_key_env) if api_key_env else None
    if key or is_loopback(host) or allow_unauthenticated:
        return key or None
    missing = f"${api_key_env} is not set" if api_key_env else "api_key_env is null"
    raise ConfigError(
        f"{where}: refusing to serve on {host} (beyond loopback) without an API key ({missing}); set "
        f"the key in the environment variable named by args.api_key_env where Ray runs, bind "
        "http_options.host: 127.0.0.1, or set args.allow_unauthenticated: true to serve openly on purpose"
    )


def _folder(value: str, name: str) -> str:
    path = resolve_path(value)
    if not path.is_dir():
        raise FileNotFoundError(
            f"args.{name}: {path} is not a folder (relative paths are taken from $HELPSTEER_HOME, else "
            "the working directory of the process that builds the app); give an absolute path"
        )
    return str(path)


def _engine(args: AppArgs) -> str:
    if args.engine != "auto":
        return args.engine
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return "vllm" if gpus and importlib.util.find_spec("vllm") is not None else "transformers"


def bind_app(args: AppArgs, options: Mapping[str, Mapping[str, Any]] | None = None) -> Application:
    """The application, with per-deployment `.options()` (the keys of a config's `deployments:`)."""
    from serve.deployments import APM, Generator
    from serve.ingress import Ingress
    from serve.steerable import SteerablePrompts

    options = dict(options or {})
    unknown = sorted(set(options) - set(DEPLOYMENTS))
    if unknown:
        raise ConfigError(f"options for unknown deployment(s) {unknown}; allowed: {', '.join(DEPLOYMENTS)}")
    generator_folder = _folder(args.generator, "generator")
    engine = _engine(args)
    settings = args.model_dump(
        include={
            "model_name",
            "defaults",
            "default_temperature",
            "limits",
            "api_key_env",
            "allow_unauthenticated",
            "reward",
        }
    )
    settings["engine"] = engine
    if engine == "vllm":
        if "Generator" in options:
            raise ConfigError(
                "deployments: Generator's options do not apply under the vllm engine (Ray Serve LLM's "
                "LLMServer replaces it); size it with args.vllm (tensor_parallel_size, accelerator_type, "
                "min_replicas, max_replicas, ...)"
            )
        from serve.vllm import build_llm_deployment

        generator = build_llm_deployment(
            args.model_name, generator_folder, SteerablePrompts.load(generator_folder).context, args.vllm
        )
    else:
        stuck_after_s = 2 * args.limits.request_timeout_s + 60
        generator = Generator.options(**options.get("Generator", {})).bind(
            generator_folder, args.generator_batching.model_dump(), stuck_after_s
        )
    apm = None
    if args.apm is not None:
        apm = APM.options(**options.get("APM", {})).bind(
            _folder(args.apm, "apm"), args.apm_batching.model_dump()
        )
    log.info("helpsteer app: generator %s (%s), apm %s", generator_folder, engine, args.apm)
    return Ingress.options(**options.get("Ingress", {})).bind(generator, apm, generator_folder, settings)


def build_app(args: AppArgs) -> Application:
    """The app builder named by `import_path: serve.app:build_app`."""
    if not isinstance(args, AppArgs):  # called directly with a dict
        args = AppArgs.model_validate(args)
    return bind_app(args)


# --- config files ---------------------------------------------------------------------------------


def unknown_keys(data: Mapping[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """Keys of `data` that `model` (recursively) has no field for: pydantic would silently drop them."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    errors = []
    for key, value in data.items():
        field = fields.get(key) or model.model_fields.get(key)
        if field is None:
            errors.append(f"{where}{key}: unknown key {key!r} (allowed: {', '.join(sorted(fields))})")
            continue
        sub = model_in(field.annotation)
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if sub is not None and isinstance(item, dict):
                suffix = f"[{index}]" if isinstance(value, list) else ""
                errors += unknown_keys(item, sub, f"{where}{key}{suffix}.")
    return errors


def load_config(path: Path = CONFIG, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Serve config file with `overrides` (dotted keys under the app's `args`, e.g. limits.max_tokens)."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise ConfigError(f"{path}: expected a Serve config with an `applications:` list")
    app = config["applications"][0]
    args = app.setdefault("args", {})
    apply_overrides(
        args,
        [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in (overrides or {}).items()],
    )
    if "apm" in (overrides or {}) and args.get("apm") is None:  # no APM: Serve refuses settings for it
        app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") != "APM"]
    return config


def check_config(config: Mapping[str, Any], where: str = "serve config") -> tuple[ServeDeploySchema, AppArgs]:
    """Ray's schema, plus every key Ray would ignore, plus the app's typed args: errors name the key."""
    errors = unknown_keys(config, ServeDeploySchema)
    schema = ServeDeploySchema.model_validate(config)
    apps = [a for a in schema.applications if a.import_path == "serve.app:build_app"]
    if len(apps) != 1:
        errors.append(f"applications: expected one with import_path serve.app:build_app, found {len(apps)}")
    else:
        errors += [f"applications[0].args.{e}" for e in unknown_keys(apps[0].args, AppArgs)]
        for deployment in apps[0].deployments:
            if deployment.name not in DEPLOYMENTS:
                errors.append(
                    f"deployments: unknown deployment {deployment.name!r}; allowed: {', '.join(DEPLOYMENTS)}"
                )
            elif deployment.name == "APM" and apps[0].args.get("apm") is None:
                errors.append(
                    "deployments: APM is listed but args.apm is null (Serve refuses settings for a "
                    "deployment the app does not have); remove it or set apm"
                )
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(errors))
    return schema, AppArgs.model_validate(apps[0].args)


def deployment_options(schema: ServeDeploySchema) -> dict[str, dict[str, Any]]:
    """Each listed deployment's settings from the config, as `.options()` keyword arguments."""
    app = schema.applications[0]
    return {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}


def deploy(config: Mapping[str, Any], where: str = "serve config") -> str:
    """Start Serve with the config's HTTP options and run its app on the connected Ray; its URL."""
    from ray import serve

    schema, args = check_config(config, where)
    app = schema.applications[0]
    if app.runtime_env:
        raise ConfigError(f"{where}: runtime_env is not applied by `helpsteer serve`; use `serve run` for it")
    http = schema.http_options
    serve.start(http_options=http.model_dump(), proxy_location=schema.proxy_location)
    serve.run(bind_app(args, deployment_options(schema)), name=app.name, route_prefix=app.route_prefix or "/")
    return f"http://{http.host}:{http.port}{app.route_prefix or '/'}"
