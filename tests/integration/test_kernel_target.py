"""EDGETP_KERNEL_TARGET: the runtime's decode kernels built for an older CPU target on this
machine (x86-64-v3: the AVX2 paths), cached apart from the native build, and the bundled demo
model's greedy generation identical on both."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import processes

from edgetp.core import settings
from edgetp.core.errors import ConfigError
from edgetp.kernels import native as kernels
from edgetp.model.demo import expected_text

DEMO_AND_PATHS = """
from edgetp.cli.main import main
from edgetp.kernels import native
try:
    main(["demo", "--nodes", "1"])
except SystemExit as exit:
    assert not exit.code, exit.code
print("paths", native.kernel_paths())
"""


def test_the_target_defaults_to_native_and_refuses_junk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.ENV_KERNEL_TARGET, raising=False)
    assert settings.kernel_target() == "native"
    monkeypatch.setenv(settings.ENV_KERNEL_TARGET, "x86-64-v3")
    assert kernels.arch_flags() == (["-march=x86-64-v3"],)
    monkeypatch.setenv(settings.ENV_KERNEL_TARGET, "native; rm -rf /")
    with pytest.raises(ConfigError, match="not a CPU target"):
        settings.kernel_target()


def run_demo(cache: Path, target: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGETP_KERNEL_CACHE": str(cache), "EDGETP_KERNEL_TARGET": target}
    return processes.run([sys.executable, "-c", DEMO_AND_PATHS], capture_output=True,
                         text=True, env=env, timeout=240)


@pytest.mark.skipif(platform.machine() != "x86_64" or not kernels.available(),
                    reason="the AVX2 target needs an x86-64 CPU and a C compiler")
def test_the_avx2_build_generates_what_the_native_build_does(tmp_path: Path) -> None:
    native, avx2 = run_demo(tmp_path, "native"), run_demo(tmp_path, "x86-64-v3")
    assert native.returncode == 0 and avx2.returncode == 0, native.stderr + avx2.stderr
    answer = f"output: {expected_text(3, 5)}"
    assert answer in native.stdout and answer in avx2.stdout, native.stdout + avx2.stdout
    assert "'f32': 'autovec'" in avx2.stdout and "'i8': 'avx2'" in avx2.stdout
    assert len(list(tmp_path.glob("matvec-*.so"))) == 2  # one library per target
