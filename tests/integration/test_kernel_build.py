"""The native decode kernels in fresh processes: switched off by the environment, a failed
build that falls back to torch, and the build cache keyed by CPU and source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import processes

from edgetp.kernels import native as kernels

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="no C compiler: the torch path is all there is")

AVAILABLE = "from edgetp.kernels import native as kernels; print(kernels.available())"


def run_isolated(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh Python with ``env`` added to the environment."""
    return processes.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)


def test_switched_off_it_is_torch_everywhere() -> None:
    result = run_isolated(AVAILABLE, EDGETP_NATIVE_KERNELS="0")
    assert result.stdout.strip() == "False"


def test_a_failed_build_warns_once_and_falls_back(tmp_path: Path) -> None:
    code = ("import torch; from edgetp.kernels import native as kernels; "
            "x, w = torch.randn(1, 8), torch.randn(4, 8); "
            "print(kernels.available(), torch.allclose(kernels.linear(x, w), x @ w.T))")
    result = run_isolated(code, CC="/bin/false", EDGETP_KERNEL_CACHE=str(tmp_path))
    assert result.stdout.strip() == "False True", result.stderr
    assert "native decode kernels unavailable" in result.stderr
    assert not list(tmp_path.glob("*.so"))


def test_build_lands_in_the_cache_keyed_by_cpu_and_source(tmp_path: Path) -> None:
    first = run_isolated(AVAILABLE, EDGETP_KERNEL_CACHE=str(tmp_path))
    assert first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.glob("matvec-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert run_isolated(AVAILABLE, EDGETP_KERNEL_CACHE=str(tmp_path)).stdout.strip() == "True"
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
