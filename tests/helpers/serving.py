"""``edgetp serve`` as a real process: started with ``--json``, ready once it prints its URL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Mapping

from edgetp.runtime.local import free_port
from helpers import processes


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
