"""An app that Serve would expose beyond loopback without an API key does not start, however it
was built: here the app is bound and run directly (as `serve run` and a RayService do, with no
`helpsteer serve` check before), and the ingress replica itself refuses, saying why."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import requests
from test_serve_units import make_sft_folder

from serve.app import AppArgs, bind_app

pytestmark = pytest.mark.slow
UNSET = "HELPSTEER_TEST_KEY_NOBODY_SETS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_app_on_all_interfaces_without_a_key_refuses_to_start_unless_allowed(
    ray_head: Any, tiny_generator: Path, tmp_path: Path
):
    from ray import serve

    sft = make_sft_folder(tiny_generator, tmp_path / "sft")
    options = {
        "Ingress": {"ray_actor_options": {"num_cpus": 0}},
        "Generator": {"ray_actor_options": {"num_cpus": 0}},
    }
    port = _free_port()
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    try:
        with pytest.raises(RuntimeError, match="Deploying application open failed"):
            serve.run(
                bind_app(AppArgs(generator=str(sft), api_key_env=UNSET), options),
                name="open",
                route_prefix="/open",
            )
        # Serve's status (what `serve status` and a RayService's status show) says why.
        reason = serve.status().applications["open"].deployments["Ingress"].message
        assert "refusing to serve on 0.0.0.0 (beyond loopback) without an API key" in reason, reason
        assert f"${UNSET} is not set" in reason
        serve.delete("open")

        allowed = AppArgs(generator=str(sft), api_key_env=UNSET, allow_unauthenticated=True)
        serve.run(bind_app(allowed, options), name="allowed", route_prefix="/allowed")
        answer = requests.get(f"http://127.0.0.1:{port}/allowed/v1/models", timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        serve.shutdown()
