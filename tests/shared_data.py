"""Reading ../shared/data from tests: skipped where a checkout has none, a failure in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file of ../shared/data: skipped where the checkout has none, a failure in CI."""
    path = SHARED / relative
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI must have ../shared/data")
        pytest.skip(f"{path} not found (../shared/data is absent)")
    return path
