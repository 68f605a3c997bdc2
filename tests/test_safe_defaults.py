"""Safe defaults of what the repo ships: nothing listens beyond 127.0.0.1 unless a file says why,
Ray token authentication stays on, no secret sits in a file, and no code path unpickles a file
with torch.load. (`helpsteer ui` binding 127.0.0.1 is covered in tests/test_cli.py.)"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AUTOSCALER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
SHIPPED_TEXT = sorted(p for p in CLUSTER.rglob("*") if p.is_file()) + [REPO / "docs" / "operations.md"]
CODE = sorted(p for d in ("helpsteer_core", "ray_jobs", "serve") for p in (REPO / d).rglob("*.py"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from walk(item)


# --- bind addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=_ids(AUTOSCALER_YAMLS))
def test_autoscaler_dashboard_stays_on_localhost(path):
    config = yaml.safe_load(path.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in path.read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_kuberay_services_stay_inside_the_cluster(path):
    """Pods listen on 0.0.0.0 (their Services need it); the Services are ClusterIP, no ingress."""
    doc = yaml.safe_load(path.read_text())
    for node in walk(doc):
        assert node.get("serviceType", "ClusterIP") == "ClusterIP", path.name  # the head's Service
        assert node.get("type") not in ("LoadBalancer", "NodePort"), path.name  # any Service spec
        assert node.get("enableIngress") is not True, path.name
    if doc["kind"] == "RayService":
        assert "ClusterIP" in path.read_text().split("apiVersion:")[0], "the header must say why 0.0.0.0"


def test_serve_config_binds_localhost():
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert config.get("http_options", {}).get("host") == "127.0.0.1", "Serve's own default is 0.0.0.0"


RAYSERVICES = [p for p in MANIFESTS if yaml.safe_load(p.read_text())["kind"] == "RayService"]


@pytest.mark.parametrize("path", RAYSERVICES, ids=_ids(RAYSERVICES))
def test_a_rayservice_beyond_loopback_takes_its_api_key_from_a_secret_on_every_pod(path):
    """The app refuses to start beyond loopback without a key (serve.app.check_exposure): a
    RayService must set the key's variable from a Secret wherever the ingress may run, or say
    `allow_unauthenticated: true` on purpose."""
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs, is_loopback

    doc = yaml.safe_load(path.read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert not is_loopback(config.http_options.host)  # a pod's Serve listens for its Service
    args = AppArgs.model_validate(config.applications[0].args)
    if args.allow_unauthenticated:
        return
    assert args.api_key_env, f"{path.name}: api_key_env is null and allow_unauthenticated is not set"
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert args.api_key_env in env, f"{path.name}: {container['name']} lacks ${args.api_key_env}"
        assert "secretKeyRef" in env[args.api_key_env].get("valueFrom", {}), "the key comes from a Secret"


# --- token authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("path", AUTOSCALER_YAMLS, ids=_ids(AUTOSCALER_YAMLS))
def test_autoscaler_starts_ray_with_token_auth(path):
    config = yaml.safe_load(path.read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert re.search(r"RAY_AUTH_MODE=token\s+RAY_AUTH_TOKEN_PATH=\S+\s+ray start", command), command
    # The token file comes from the user's machine, not from the repo.
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/(\S+)", ray_starts[0]).group(1)
    assert config["file_mounts"][f"~/{token_path}"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in path.read_text() and "RAY_AUTH_MODE=disabled" not in path.read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_kuberay_clusters_use_token_auth(path):
    doc = yaml.safe_load(path.read_text())
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    assert cluster.get("authOptions", {}).get("mode") == "token", "authOptions: {mode: token} is missing"
    major, minor = map(int, cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "token auth needs Ray 2.52+"
    envs = [e for node in walk(doc) for e in node.get("env", []) if isinstance(e, dict)]
    assert not [e for e in envs if e.get("name") == "RAY_AUTH_MODE" and e.get("value") != "token"]


# --- secrets --------------------------------------------------------------------------------------

TOKEN_FORMATS = re.compile(
    r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
# NAME=value or name: value where the name says secret and the value is a literal (not $VAR, a
# path or a mapping). A bare `key:` names something (a toleration, a metadata item, a Secret's key).
SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:key|secret|token|passw(?:or)?d|credentials?)[\w.-]*)\s*[=:]\s*"
    r"[\"']?(?![$/~{<\[])([^\s\"'`,}]{8,})"
)
SECRET_NAME = re.compile(r"(?i)key|secret|token|passw|credential")


def find_secrets(text: str) -> list[str]:
    """Literal secrets in a shipped text file: known token formats and secret-named assignments."""
    found = [f"token-like string {m.group(0)[:8]}..." for m in TOKEN_FORMATS.finditer(text)]
    found += [
        f"{m.group(1)} is set to a literal"
        for m in SECRET_ASSIGNMENT.finditer(text)
        if m.group(1).lower() != "key"
    ]
    return found


def literal_secret_env(doc: Any) -> list[str]:
    """Kubernetes env entries with a secret-like name and a literal `value` (not `valueFrom`)."""
    return [
        f"env {node['name']} has a literal value"
        for node in walk(doc)
        if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) and "value" in node
    ]


@pytest.mark.parametrize("path", SHIPPED_TEXT, ids=_ids(SHIPPED_TEXT))
def test_no_secrets_in_shipped_files(path):
    text = path.read_text()
    found = find_secrets(text)
    if path.suffix == ".yaml":
        found += literal_secret_env(yaml.safe_load(text))
    assert found == []


def test_a_planted_secret_is_found():
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "train_sft.yaml").read_text())
    container = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "HF_TOKEN", "value": "not-from-a-secret"})
    assert literal_secret_env(manifest) == ["env HF_TOKEN has a literal value"]

    planted = {
        "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCY": "AWS_SECRET_ACCESS_KEY",
        "mlflow_password: correct-horse-battery": "mlflow_password",
        "key: AKIAIOSFODNN7EXAMPLE": "token-like",
        "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEF": "token-like",
    }
    for line, name in planted.items():
        assert any(name in f for f in find_secrets(line)), line
    for harmless in (
        "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token",
        "~/.ray/auth_token: ~/.ray/auth_token",
        "--from-literal=token=$HF_TOKEN",
        "secretKeyRef: {name: hf-token, key: token}",
    ):
        assert find_secrets(harmless) == [], harmless


# --- unpickling -----------------------------------------------------------------------------------

# DeepSpeed's checkpoint loader unpickles its own files (torch.load(weights_only=False)). It is
# called in one place, documented there: checkpoints this run wrote itself.
DEEPSPEED_EXCEPTION = ("ray_jobs/deepspeed_engine.py", "load_engine")


def _torch_load_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the torch module (`import torch as T`) and to torch.load (`from torch import load`)."""
    modules, functions = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            functions |= {a.asname or a.name for a in node.names if a.name == "load"}
    return modules, functions


def unsafe_loads(source: str, filename: str) -> list[str]:
    """torch.load calls without weights_only=True, pickle loads, non-safetensors saving and loading,
    and DeepSpeed checkpoint loading outside its one documented place."""
    tree = ast.parse(source, filename)
    torch_modules, torch_loads = _torch_load_names(tree)
    enclosing = {id(c): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for c in ast.walk(f)}
    found = []
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: n.lineno):
        func, where = node.func, f"{filename}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        is_torch_load = (owner in torch_modules and name == "load") or (
            isinstance(func, ast.Name) and name in torch_loads
        )
        weights_only = keywords.get("weights_only")
        if is_torch_load and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{where}: torch.load without weights_only=True")
        if owner in ("pickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
            found.append(f"{where}: {owner}.{name}")
        if name == "load_checkpoint" and (filename, enclosing.get(id(node))) != DEEPSPEED_EXCEPTION:
            found.append(f"{where}: DeepSpeed load_checkpoint outside {'::'.join(DEEPSPEED_EXCEPTION)}")
        for flag in ("safe_serialization", "use_safetensors"):
            if isinstance(keywords.get(flag), ast.Constant) and keywords[flag].value is False:
                found.append(f"{where}: {flag}=False")
    return found


def test_no_code_path_unpickles_model_files():
    found = [f for path in CODE for f in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


def test_the_deepspeed_exception_is_where_it_is_documented():
    path = REPO / DEEPSPEED_EXCEPTION[0]
    tree = ast.parse(path.read_text())
    functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    load_engine = functions[DEEPSPEED_EXCEPTION[1]]
    assert "weights_only=False" in (ast.get_docstring(load_engine) or "")


def test_the_unpickling_scan_finds_planted_calls():
    planted = """
import pickle
import torch
import torch as T
from torch import load as tload
torch.load(path)
T.load(path, weights_only=False)
tload(path)
pickle.loads(blob)
engine.load_checkpoint(folder)
model.save_pretrained(out, safe_serialization=False)
ok = torch.load(path, weights_only=True)
"""
    found = unsafe_loads(planted, "ray_jobs/planted.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "pickle.loads",
        "DeepSpeed load_checkpoint outside ray_jobs/deepspeed_engine.py::load_engine",
        "safe_serialization=False",
    ]
