"""Link emulation on the real system: the Docker entrypoint applies a profile and then runs
edgetp, and ``edgetp.ops.linkemu apply`` shapes a throwaway network namespace with tc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers.paths import REPO


def test_the_entrypoint_applies_the_profile_then_runs_edgetp(tmp_path: Path) -> None:
    """docker/entrypoint.sh, with a python that reports what edgetp would have been run with."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "edgetp.ops.linkemu" ]; then exec {sys.executable} "$@"; fi
echo "args=$*"; echo "delay=$EDGETP_LINK_DELAY_MS"; echo "emulation=$EDGETP_LINK_EMULATION"
""")
    fake.chmod(0o755)
    env = {**os.environ, "EDGETP_PYTHON": str(fake), "EDGETP_LINK_PROFILE": "home-wifi",
           "EDGETP_LINK_DEV": f"nodev{uuid.uuid4().hex[:6]}"}  # tc fails: nothing is shaped
    result = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "worker", "--shard", "x y"],
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "args=-m edgetp.cli worker --shard x y"
    assert lines[1] == "delay=5"
    assert lines[2].startswith("emulation=home-wifi: bandwidth not limited + transport delay 5ms")
    env.pop("EDGETP_LINK_PROFILE")
    result = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "--version"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines()[1:] == ["delay=", "emulation=none"]


@pytest.mark.skipif(not (sys.platform == "linux" and os.geteuid() == 0 and shutil.which("tc")),
                    reason="needs root, Linux and tc (a throwaway network namespace)")
def test_real_tc_in_a_namespace() -> None:
    ns = f"edgetp-linkemu-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "edgetp.ops.linkemu",
                              "apply", "--profile", "home-wifi", "--dev", "lo"],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
        qdisc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "lo"],
                               capture_output=True, text=True, check=True).stdout
        if "netem" in qdisc:
            assert "export EDGETP_LINK_DELAY_MS=0" in out and "delay 5ms" in qdisc
        else:  # this kernel has no netem: tbf for the rate, the transport for the delay
            assert "tbf" in qdisc and "rate 100Mbit" in qdisc
            assert "export EDGETP_LINK_DELAY_MS=5" in out
            assert "transport delay 5ms" in out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
