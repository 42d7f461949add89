"""The kernel harness itself (tests/kernels/run_harness.py, ``make test-kernels``): its table
covers every exported product, it passes on this CPU's build, and it fails on a broken kernel
(the slow set: each broken kernel is built for two targets). All targets, AArch64 under qemu
included, run in the slow test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import run_harness
from kernel_cases import KERNELS, check_table, exported_kernels

from edgetp.kernels.native import SOURCE

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def test_the_table_names_every_exported_product() -> None:
    assert set(exported_kernels()) == set(KERNELS)


def test_a_product_missing_from_the_table_stops_the_run(tmp_path: Path) -> None:
    source = tmp_path / "matvec.c"
    source.write_text(SOURCE.read_text() + "\nint et_matvec_new(const float *x) { return 0; }\n")
    with pytest.raises(SystemExit, match="et_matvec_new"):
        check_table(source)


@needs_cc
def test_the_native_build_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_harness.main(["--target", "native"]) == 0
    report = capsys.readouterr().out
    assert "paths: f32:" in report
    assert all(f"{name} " in report for name in KERNELS)


BOTH = ("native", "x86-64-v3")


@needs_cc
@pytest.mark.slow  # two builds each, ~7 s a case: CI runs them with the slow tests
@pytest.mark.parametrize("wrong, right, targets", [
    ("for (int64_t r = 0; r < rows; r++) {\n        const float *wr",
     "for (int64_t r = 0; r + 1 < rows; r++) {\n        const float *wr", BOTH),  # a row skipped
    ("xv[k] = f32_load(x + i + k * F32_LANES);",
     "xv[k] = f32_load(x + i);", BOTH),  # long float32 rows: the wrong part of x
    # long bfloat16 rows without AVX-512 BF16 (the AVX2 and NEON pass): the wrong part of x
    ("bf16_fma(w_hi, x_hi[k], acc[j][2 * k + 1]);", "bf16_fma(w_hi, x_hi[0], acc[j][2 * k + 1]);",
     ("x86-64-v3",)),
    ("return sum * bf16_value(scale);", "return sum * bf16_value(scale) * 1.0001f;", BOTH),
    # a batched row one float32 step off its one-row product: within the reference's
    # tolerance, caught by the bitwise comparison with the one-row kernel
    ("x + t * cols, y + t * rows + r, min64(step, to - r), cols);\n",
     "x + t * cols, y + t * rows + r, min64(step, to - r), cols),\n"
     "            y[t * rows + r] = t ? nextafterf(y[t * rows + r], INFINITY) : y[r];\n", BOTH),
])
def test_a_wrong_kernel_fails(tmp_path: Path, wrong: str, right: str, targets: tuple[str, ...],
                              capsys: pytest.CaptureFixture[str]) -> None:
    text = SOURCE.read_text()
    assert wrong in text
    (tmp_path / "matvec.c").write_text(text.replace(wrong, right, 1))
    for target in targets:
        assert run_harness.main(["--target", target, "--source-dir", str(tmp_path)]) == 1
        assert "FAIL" in capsys.readouterr().out


@needs_cc
def test_a_library_source_that_does_not_build_fails_the_run(tmp_path: Path) -> None:
    """The library's other sources are compiled for each target too."""
    (tmp_path / "matvec.c").write_text(SOURCE.read_text())
    spin = SOURCE.parent / "spinwait.c"
    (tmp_path / "spinwait.c").write_text(spin.read_text() + "\nint broken( {\n")
    with pytest.raises(SystemExit, match="spinwait.c does not build"):
        run_harness.main(["--target", "native", "--source-dir", str(tmp_path)])


@pytest.mark.slow
def test_every_target_passes_under_emulation() -> None:
    tools = ["cc", run_harness.AARCH64_CC, run_harness.QEMU]
    if not all(shutil.which(tool) for tool in tools):
        pytest.skip("cross compiler or qemu-user missing (make test-kernels installs none; "
                    ".ci/run does)")
    assert run_harness.main([]) == 0
