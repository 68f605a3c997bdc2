"""What pyproject.toml claims about Python holds: `requires-python` starts where the pinned
packages start, read from the metadata of the distributions installed at those pins."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """Every `name==version` in requirements.lock and pyproject's dependencies (dev included)."""
    project = PYPROJECT["project"]
    lines = [*project["dependencies"], *project.get("optional-dependencies", {}).get("dev", [])]
    lines += [line.split("#")[0].strip() for line in (REPO / "requirements.lock").read_text().splitlines()]
    found: dict[str, str] = {}
    for line in filter(None, lines):
        requirement = Requirement(line)
        [spec] = [s for s in requirement.specifier if s.operator == "=="]
        found[canonicalize_name(requirement.name)] = spec.version
    return found


def lower_bound(specifier: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in specifier if s.operator in (">=", ">", "~=", "==")]
    return max(bounds, default=None)


def test_requires_python_is_the_highest_floor_among_the_pinned_packages():
    floors: dict[str, Version] = {}
    for name, version in pins().items():
        installed = importlib.metadata.version(name)
        assert Version(installed) == Version(version), f"{name}: pinned {version}, installed {installed}"
        requires = importlib.metadata.metadata(name).get("Requires-Python")
        if requires and (floor := lower_bound(SpecifierSet(requires))) is not None:
            floors[name] = floor
    highest = max(floors.values())
    claimed = lower_bound(SpecifierSet(PYPROJECT["project"]["requires-python"]))
    needing = sorted(n for n, f in floors.items() if f == highest)
    assert claimed == highest, f"requires-python starts at {claimed}; {needing} need Python >= {highest}"


def test_readme_claims_the_same_python():
    claimed = lower_bound(SpecifierSet(PYPROJECT["project"]["requires-python"]))
    readme = (REPO / "README.md").read_text()
    mentioned = {Version(v) for v in re.findall(r"Python (3\.\d+)", readme)}
    assert mentioned and min(mentioned) == claimed, f"README names Python {sorted(map(str, mentioned))}"
