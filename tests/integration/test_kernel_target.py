"""EDGETP_KERNEL_TARGET: the runtime's decode kernels built for an older CPU target on this
machine (x86-64-v3: the AVX2 paths), cached apart from the native build, and the bundled demo
model's greedy generation identical on both; int4 weights streamed through the window on the
AVX2 build decode with its C kernel, as the resident ones do, and answer the rule."""

from __future__ import annotations

import json
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
    for product in ("f32", "bf16", "i8", "i8_b32", "i4"):
        assert f"'{product}': 'avx2'" in avx2.stdout, avx2.stdout
    assert len(list(tmp_path.glob("matvec-*.so"))) == 2  # one library per target


STREAMED_INT4 = """
import sys, torch
from pathlib import Path
from edgetp.kernels import native
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt
from edgetp.model.tokenizer import Tokenizer
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank, shard_memory_needs
from edgetp.parallel.qlinear import QuantLinear
from edgetp.shard.split import split_checkpoint

shard = split_checkpoint(DEMO_MODEL_DIR, Path(sys.argv[1]), 1, dtype="int4").rank_dirs[0]
products = []
int4_linear = native.int4_linear
def counted(*args, **kwargs):
    y = int4_linear(*args, **kwargs)
    products.append(y is not None)
    return y
native.int4_linear = counted
tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)

def greedy(budget):
    model = load_rank(shard, SoloCommunicator(), max_seq_len=128, memory_budget=budget)
    streamed = sum(m.streamed for m in model.modules() if isinstance(m, QuantLinear))
    ids, out = tokenizer.encode(demo_prompt(3, 5)), []
    with torch.inference_mode():
        logits, pos = model(torch.tensor(ids))[-1], len(ids)
        for _ in range(12):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor(out[-1:]), pos)[-1]
            pos += 1
    return out, streamed

streamed, n_streamed = greedy(shard_memory_needs(shard, max_seq_len=128).minimum())
resident, n_resident = greedy(None)
print("paths", native.kernel_paths())
print("streamed linears", n_streamed, "resident", n_resident)
print("native products", sum(products), "of", len(products))
print("same", streamed == resident)
print("text", tokenizer.decode(streamed))
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or not kernels.available(),
                    reason="the AVX2 target needs an x86-64 CPU and a C compiler")
def test_streamed_int4_decodes_with_the_avx2_kernel(tmp_path: Path) -> None:
    env = {**os.environ, "EDGETP_KERNEL_CACHE": str(tmp_path / "cache"),
           "EDGETP_KERNEL_TARGET": "x86-64-v3"}
    result = processes.run([sys.executable, "-c", STREAMED_INT4, str(tmp_path / "split")],
                           capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert "'i4': 'avx2'" in lines["paths"]
    streamed, resident = lines["streamed"].split()[1], lines["streamed"].split()[3]
    assert int(streamed) > 0 and resident == "0"  # every projection streamed, then none
    done, calls = lines["native"].split()[1], lines["native"].split()[3]
    assert done == calls and int(calls) > 0  # every int4 product took the C kernel
    assert lines["same"] == "True"  # streamed and resident weights: the same tokens
    assert expected_text(3, 5).startswith(lines["text"])


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or not kernels.available(),
                    reason="the AVX2 target needs an x86-64 CPU and a C compiler")
def test_the_benchmark_prints_each_products_rate_for_both_builds(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "quant_kernels.py"
    env = {**os.environ, "EDGETP_KERNEL_CACHE": str(tmp_path)}
    result = processes.run([sys.executable, str(script), "--target", "x86-64-v3", "--quick",
                            "--json"], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["paths"]["x86-64-v3"]["i4"] == "avx2"
    assert set(report["gb_per_s"]) == {"f32", "bf16", "i8", "i8_b32", "i4"}
    for per_shape in report["gb_per_s"].values():
        assert all(rate["native"] > 0 and rate["x86-64-v3"] > 0 for rate in per_shape.values())
