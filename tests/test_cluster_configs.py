"""Every file in cluster/ checked offline the way its consumer checks it, plus strictly, so that a
typo fails here instead of being dropped on the cluster:

- autoscaler YAMLs (`ray up`): Ray's own `prepare_config` + `validate_config` (ray-schema.json
  rejects unknown keys at the top and per node type), plus the `provider:` keys that schema names;
- KubeRay manifests: the CRD's openAPIV3Schema from ../shared/schemas/kuberay with
  `additionalProperties: false` wherever it lists properties (Kubernetes prunes unknown fields);
- Serve configs (the RayService's serveConfigV2, serve/config.yaml): Ray Serve's
  `ServeDeploySchema` plus a walk over its fields, since it ignores unknown keys;
- launch lines (the RayJobs' entrypoints and every `ray job submit` in docs/operations.md): parsed
  by the stage's own `main`, up to the point where it would start working.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import json
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from pydantic import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from serve.app import unknown_keys
from serve.protocol import model_in

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AUTOSCALER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
CRD_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
SERVE_CONFIG = REPO / "serve" / "config.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
IMAGE_HOME = "/home/ray/helpsteer/"  # where cluster/kuberay/Dockerfile puts the configs
STAGES = ("filter_data", "train_apm", "relabel", "train_sft", "evaluate", "pipeline")

needs_crds = pytest.mark.skipif(
    not CRD_SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {CRD_SCHEMAS} (../shared is absent)"
)


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# --- autoscaler YAMLs -----------------------------------------------------------------------------


RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check_autoscaler(config: dict[str, Any]) -> None:
    """What `ray up` checks, plus provider keys: ray-schema.json leaves `provider:` open."""
    validate_config(prepare_config(copy.deepcopy(config)))
    known = RAY_SCHEMA["properties"]["provider"]["properties"]
    unknown = sorted(set(config.get("provider", {})) - set(known))
    if unknown:
        raise ValueError(f"provider: unknown key(s) {unknown}; allowed: {sorted(known)}")


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=_ids(AUTOSCALER_YAMLS))
def test_autoscaler_yaml_passes_rays_validation(path):
    check_autoscaler(load_yaml(path))


def test_the_expected_clusters_exist():
    assert {p.name for p in AUTOSCALER_YAMLS} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "aws-cpu.yaml"}
    assert {p.stem for p in MANIFESTS} >= {*STAGES, "serve"}


def _first_node_type(config: dict[str, Any]) -> dict[str, Any]:
    return next(iter(config["available_node_types"].values()))


AUTOSCALER_TYPOS = {
    "top level": (lambda c: c, "max_worker"),
    "node type": (_first_node_type, "min_worker"),
    "provider": (lambda c: c["provider"], "regoin"),
    "docker": (lambda c: c["docker"], "imagee"),
}


@pytest.mark.parametrize("where", AUTOSCALER_TYPOS)
@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=_ids(AUTOSCALER_YAMLS))
def test_autoscaler_typo_fails_naming_the_key(path, where):
    config = load_yaml(path)
    section, key = AUTOSCALER_TYPOS[where]
    section(config)[key] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError), match=key):
        check_autoscaler(config)


# --- KubeRay manifests ----------------------------------------------------------------------------

# The CRDs leave top-level metadata open (the API server checks ObjectMeta); these are the fields
# a manifest in this repo may set.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject keys the schema does not declare, wherever it declares properties."""
    if schema.get("properties") and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    for sub in schema.get("properties", {}).values():
        strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            strict(sub)
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd_file = CRD_SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    return jsonschema.Draft7Validator(schema)


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayJob", "RayService"):
        return [f"expected apiVersion ray.io/v1 and kind RayJob or RayService, got {doc.get('kind')}"]
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in crd_validator(doc["kind"]).iter_errors(doc)
    ]
    if doc["kind"] == "RayService" and not errors:
        errors += serve_config_errors(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    return errors


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_kuberay_manifest_matches_its_crd(path):
    assert manifest_errors(load_yaml(path)) == []


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def _worker_container(doc: dict[str, Any]) -> dict[str, Any]:
    return _cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


MANIFEST_TYPOS = {
    "metadata": (lambda d: d["metadata"], "nmae"),
    "spec": (lambda d: d["spec"], "shutdownAfterJobFinish"),
    "cluster spec": (_cluster_spec, "enableInTreeAutoscale"),
    "worker group": (lambda d: _cluster_spec(d)["workerGroupSpecs"][0], "maxReplica"),
    "container": (_worker_container, "volumeMount"),
    "resources": (lambda d: _worker_container(d)["resources"], "limit"),
}


@needs_crds
@pytest.mark.parametrize("where", MANIFEST_TYPOS)
@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_kuberay_typo_fails_naming_the_key(path, where):
    doc = load_yaml(path)
    section, key = MANIFEST_TYPOS[where]
    section(doc)[key] = {}
    errors = manifest_errors(doc)
    assert errors and any(repr(key) in e for e in errors), errors


# --- Serve configs --------------------------------------------------------------------------------


def serve_config_errors(config: dict[str, Any]) -> list[str]:
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [str(exc)]
    return unknown_keys(config, ServeDeploySchema)


def rayservice_configs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, yaml.safe_load(doc["spec"]["serveConfigV2"]))
        for path in MANIFESTS
        if (doc := load_yaml(path)).get("kind") == "RayService"
    ]


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    """The RayService's config and serve/config.yaml (a missing file is an error, not a skip)."""
    return [*rayservice_configs(), ("serve/config.yaml", load_yaml(SERVE_CONFIG))]


@pytest.mark.parametrize("name,config", rayservice_configs(), ids=[n for n, _ in rayservice_configs()])
def test_rayservice_serve_config_matches_rays_schema(name, config):
    assert serve_config_errors(config) == []
    assert [app["import_path"] for app in config["applications"]] == ["serve.app:build_app"]


def test_serve_config_yaml_matches_rays_schema():
    assert serve_config_errors(load_yaml(SERVE_CONFIG)) == []


SERVE_TYPOS = {
    "top level": (lambda c: c, "http_option"),
    "application": (lambda c: c["applications"][0], "route_prefx"),
    "deployment": (
        lambda c: c["applications"][0].setdefault("deployments", [{"name": "APM"}])[0],
        "num_replica",
    ),
}


@pytest.mark.parametrize("where", SERVE_TYPOS)
@pytest.mark.parametrize("name,config", serve_configs(), ids=[n for n, _ in serve_configs()])
def test_serve_typo_fails_naming_the_key(name, config, where):
    config = copy.deepcopy(config)
    section, key = SERVE_TYPOS[where]
    section(config)[key] = 1
    errors = serve_config_errors(config)
    assert any(repr(key) in e for e in errors), (name, errors)


def test_serve_app_args_match_the_builder():
    """The args in every Serve config load into the app builder's typed args, with no extra keys."""
    builder = importlib.import_module("serve.app").build_app
    args_model = model_in(next(iter(typing.get_type_hints(builder).values()), None))
    assert args_model is not None, (
        f"serve.app.build_app{inspect.signature(builder)} takes no pydantic args model"
    )
    for name, config in serve_configs():
        args = config["applications"][0].get("args", {})
        args_model.model_validate(args)
        assert unknown_keys(args, args_model) == [], name


# --- launch lines ---------------------------------------------------------------------------------


def submit_lines() -> list[str]:
    """Every `ray job submit` command in docs/operations.md, continuation lines joined."""
    text = OPERATIONS.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith("ray job submit")]


def entrypoints() -> list[tuple[str, str]]:
    return [
        (p.name, d["spec"]["entrypoint"]) for p in MANIFESTS if (d := load_yaml(p)).get("kind") == "RayJob"
    ]


def launch(argv: list[str], monkeypatch, capsys) -> Any:
    """Run `python -m ray_jobs.<stage> --config FILE overrides...` up to its `run`: the config it gets."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("ray_jobs."), argv
    module, args = argv[2], argv[3:]
    config = args[args.index("--config") + 1]
    local = REPO / config.removeprefix(IMAGE_HOME)
    assert local.is_file(), f"{config}: no such config in the repository"
    args[args.index("--config") + 1] = str(local)
    stage = importlib.import_module(module)
    seen: list[Any] = []
    monkeypatch.setattr(stage, "run", seen.append)
    status = stage.main(args)
    assert status == 0, capsys.readouterr().err
    return seen[0]


def _module_of(line: str) -> str:
    words = shlex.split(line)
    return words[words.index("--") + 3]  # -- python -m ray_jobs.<stage>


def test_operations_doc_has_a_submit_line_per_stage():
    assert {_module_of(line) for line in submit_lines()} >= {f"ray_jobs.{s}" for s in STAGES}


@pytest.mark.parametrize("line", submit_lines(), ids=[_module_of(line) for line in submit_lines()])
def test_submit_line_in_docs_parses(line, monkeypatch, capsys):
    words = shlex.split(line)
    assert "--working-dir" in words and words[words.index("--working-dir") + 1] == "."
    launch(words[words.index("--") + 1 :], monkeypatch, capsys)


@pytest.mark.parametrize("name,entrypoint", entrypoints(), ids=[n for n, _ in entrypoints()])
def test_rayjob_entrypoint_parses_and_fits_its_cluster(name, entrypoint, monkeypatch, capsys):
    config = launch(shlex.split(entrypoint), monkeypatch, capsys)
    cpus, gpus = asks(config)
    groups = _cluster_spec(load_yaml(CLUSTER / "kuberay" / name))["workerGroupSpecs"]
    limits = [
        (g["maxReplicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in groups
    ]
    assert cpus <= sum(n * float(lim["cpu"]) for n, lim in limits), (name, cpus)
    assert gpus <= sum(n * float(lim.get("nvidia.com/gpu", 0)) for n, lim in limits), (name, gpus)


def asks(config: Any) -> tuple[float, float]:
    """(CPUs, GPUs) a stage config asks Ray for: training workers or relabel actors."""
    if hasattr(config, "num_workers"):
        return config.num_workers * config.cpus_per_worker, config.num_workers * int(config.use_gpu)
    if hasattr(config, "actors"):
        return config.actors * config.cpus_per_actor, config.actors * config.gpus_per_actor
    return 0, 0


# --- headers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS + MANIFESTS, ids=_ids(AUTOSCALER_YAMLS + MANIFESTS))
def test_each_file_starts_with_how_to_bring_it_up_and_its_cost(path):
    header = "\n".join(re.findall(r"^#.*", path.read_text().split("\n\n")[0], re.M))
    assert path.read_text().startswith("# ")
    bring_up = (
        f"ray up cluster/{path.name}"
        if path.parent == CLUSTER
        else f"kubectl apply -f cluster/kuberay/{path.name}"
    )
    assert bring_up in header
    assert "approximate on-demand list price" in header and re.search(r"\$[\d.]+/h", header)


# --- GPU serving ----------------------------------------------------------------------------------


def _replica_gpus(app: dict[str, Any]) -> dict[str, tuple[float, int, int]]:
    """Each model deployment's (GPUs a replica, min replicas, max replicas): from `deployments:`,
    or for the vllm engine's generator from `args.vllm` (Ray Serve LLM sizes it)."""
    deployments = {d["name"]: d for d in app["deployments"]}
    sized = {}
    for model in ("Generator", "APM"):
        if model == "Generator" and app["args"].get("engine") == "vllm":
            vllm = app["args"]["vllm"]
            gpus = vllm["tensor_parallel_size"] * vllm.get("pipeline_parallel_size", 1)
            sized[model] = (gpus, vllm["min_replicas"], vllm["max_replicas"])
            continue
        options, scaling = deployments[model]["ray_actor_options"], deployments[model]["autoscaling_config"]
        sized[model] = (options["num_gpus"], scaling["min_replicas"], scaling["max_replicas"])
    return sized


@pytest.mark.parametrize("name,config", rayservice_configs(), ids=[n for n, _ in rayservice_configs()])
def test_rayservice_gives_every_model_replica_gpus_and_autoscaling_bounds_that_fit_its_pods(name, config):
    app = config["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    vllm = app["args"].get("engine") == "vllm"
    assert set(deployments) == ({"Ingress", "APM"} if vllm else {"Ingress", "Generator", "APM"}), name
    workers = _cluster_spec(load_yaml(CLUSTER / "kuberay" / name))["workerGroupSpecs"]
    pod_gpus = [
        float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in workers
    ]
    most = 0.0
    for model, (gpus, low, high) in _replica_gpus(app).items():
        assert gpus >= 1, model
        assert gpus <= max(pod_gpus), f"{model}: one replica must fit one pod"
        assert 1 <= low <= high, model
        most += gpus * high
    assert most <= sum(g["maxReplicas"] * gpus for g, gpus in zip(workers, pod_gpus, strict=True))
    assert "num_gpus" not in deployments["Ingress"]["ray_actor_options"]
