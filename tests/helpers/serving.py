"""The API server in tests: ``edgetp serve`` as a real process (started with ``--json``,
ready once it prints its URL), or an :class:`APIServer` in the test's process on a running
cluster's master, and the official ``openai`` client for either."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import openai

from edgetp.runtime.local import free_port
from edgetp.runtime.master import Master
from edgetp.serve.server import APIServer, ServerSettings
from helpers import processes
from helpers.cluster import call_with_deadline

DEMO_MODEL_NAME = "edgetp-demo"


@contextlib.contextmanager
def serving(master: Master, **settings: Any) -> Iterator[APIServer]:
    """An API server for ``master`` on a free port, serving the demo model's name with
    ``settings`` (ServerSettings' fields); stopped (within 30 s, or the test fails) after."""
    server = APIServer(master, ServerSettings(DEMO_MODEL_NAME, **settings), port=0).start()
    try:
        yield server
    finally:
        call_with_deadline(server.stop, 30, "stopping the server")


def openai_client(server: APIServer, timeout_s: float = 60) -> openai.OpenAI:
    """The official client for ``server``, without retries (a failure must show)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=timeout_s)


def spawn_server(args: list[str], env: Mapping[str, str], ready_s: float
                 ) -> tuple[subprocess.Popen[str], str]:
    """``edgetp serve ARGS --port FREE --json``: the process and its URL once it is ready (the
    test fails if it is not ready within ``ready_s``)."""
    proc = processes.spawn([sys.executable, "-m", "edgetp.cli", "serve", *args, "--port",
                            str(free_port()), "--json"], env=dict(env), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    url: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                url.append(json.loads(line)["url"])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(ready_s)
    if not url:
        processes.kill_group(proc)
        raise AssertionError(f"serve did not get ready in {ready_s:g} s (status {proc.poll()})")
    return proc, url[0]
