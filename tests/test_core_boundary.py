"""helpsteer_core never imports ray, mlflow or deepspeed, so every piece of pure logic can be tested
in a plain Python process. Checked twice: by importing every module in a fresh interpreter, and by
reading every source file for an import line of those packages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import helpsteer_core

FORBIDDEN = ("ray", "mlflow", "deepspeed")
CORE_DIR = Path(helpsteer_core.__file__).resolve().parent
REPO = CORE_DIR.parent

# `import ray`, `import ray.data as rd`, `import os, ray`, `from ray import x`, `from mlflow.x import y`,
# at any indentation (imports inside functions count too).
IMPORT_LINE = re.compile(
    r"^\s*(?:from\s+(?P<from>[\w.]+)\s+import\b|import\s+(?P<names>[\w., \t]+?)(?:\s+as\s+\w+)?\s*(?:#.*)?$)"
)


def forbidden_imports(source: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(source.splitlines(), start=1):
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        if match["from"]:
            modules = [match["from"]]
        else:
            modules = [part.split(" as ")[0].strip() for part in match["names"].split(",")]
        if any(m.split(".")[0] in FORBIDDEN for m in modules):
            found.append((number, line.strip()))
    return found


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import helpsteer_core
names = ["helpsteer_core"]
for info in pkgutil.walk_packages(helpsteer_core.__path__, "helpsteer_core."):
    importlib.import_module(info.name)
    names.append(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
print(json.dumps({{"imported": names, "forbidden": loaded}}))
"""


def test_importing_every_core_module_loads_no_framework() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL.format(forbidden=set(FORBIDDEN))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {f"helpsteer_core.{p.stem}" for p in CORE_DIR.glob("*.py") if p.stem != "__init__"}
    assert expected <= set(report["imported"]), "walk_packages missed a module"
    assert {"helpsteer_core.readers", "helpsteer_core.filters", "helpsteer_core.conversation"} <= expected
    assert report["forbidden"] == []


def test_no_core_source_file_has_a_framework_import_line() -> None:
    files = sorted(CORE_DIR.rglob("*.py"))
    assert len(files) >= 8
    offenders = {
        str(path.relative_to(REPO)): hits for path in files if (hits := forbidden_imports(path.read_text()))
    }
    assert offenders == {}


@pytest.mark.parametrize(
    "line",
    [
        "import ray",
        "    import ray.data as rd",
        "import os, mlflow",
        "from deepspeed import initialize",
        "from ray.train import report  # noqa",
        "\tfrom mlflow.tracking import MlflowClient",
    ],
)
def test_the_static_check_catches_framework_imports(line: str) -> None:
    assert forbidden_imports(f"x = 1\n{line}\n") == [(2, line.strip())]


@pytest.mark.parametrize(
    "line",
    ["import rayon", "from raylib import x", "import mlflowx", "# import ray", 'text = "import ray"'],
)
def test_the_static_check_ignores_lookalikes(line: str) -> None:
    assert forbidden_imports(line) == []
