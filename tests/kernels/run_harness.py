"""Build the kernel harness for each target and run it (``make test-kernels``).

    python tests/kernels/run_harness.py [--target NAME ...]

Writes the reference cases (kernel_cases.py) into a temporary directory, compiles
``harness.c`` (which includes ``edgetp/kernels/csrc/matvec.c``) with the runtime's own flags
(``edgetp.kernels.native.COMMON_FLAGS``) plus each target's, and runs it: x86 targets directly,
AArch64 builds (static, Debian's ``aarch64-linux-gnu-gcc``) under ``qemu-aarch64`` with a CPU
model that lacks the dot-product extension (Cortex-A53: the NEON smlal paths), has it alone
(Cortex-A76, a Raspberry Pi 5: sdot) or has it with the int8 matrix multiply (qemu's ``max``:
sdot and usdot). Exit status 1 when a case fails or a
target's tools are missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from kernel_cases import write_cases  # noqa: E402

from edgetp.kernels.native import COMMON_FLAGS, LIBRARY_FLAGS, SOURCE, SOURCES  # noqa: E402

AARCH64_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"


@dataclass(frozen=True)
class Target:
    """A build of the kernels: compiler, -march flags, and how to run the binary."""

    name: str
    compiler: str
    flags: tuple[str, ...]
    runner: tuple[str, ...] = ()
    host_arch: str = "x86_64"  # runs directly only on this architecture (else not built)

    def tools(self) -> list[str]:
        return [self.compiler, *self.runner[:1]]


TARGETS = (
    Target("native", "cc", ("-march=native",), host_arch=platform.machine()),
    Target("x86-64-v3", "cc", ("-march=x86-64-v3",)),  # AVX2 + FMA, no AVX-512
    Target("x86-64-v2", "cc", ("-march=x86-64-v2",)),  # SSE4.2 only
    Target("aarch64", AARCH64_CC, ("-march=armv8-a", "-static"),
           (QEMU, "-cpu", "cortex-a53"), host_arch="any"),  # no dot product
    Target("aarch64-a76", AARCH64_CC, ("-march=armv8.2-a+dotprod", "-static"),
           (QEMU, "-cpu", "cortex-a76"), host_arch="any"),  # dot product only (Raspberry Pi 5)
    Target("aarch64-dotprod", AARCH64_CC, ("-march=armv8.2-a+dotprod+i8mm", "-static"),
           (QEMU, "-cpu", "max"), host_arch="any"),  # dot product and int8 matrix multiply
)


def harness_flags() -> list[str]:
    """The runtime's flags for an executable (not a shared library)."""
    return [f for f in COMMON_FLAGS if f not in ("-shared", "-fPIC")]


def build(target: Target, cases: Path, source_dir: Path) -> Path:
    compile_library_sources(target, cases, source_dir)
    binary = cases / f"harness-{target.name}"
    command = [target.compiler, *harness_flags(), *target.flags, "-I", str(source_dir),
               "-I", str(SOURCE.parent), "-I", str(cases), str(HERE / "harness.c"),
               "-o", str(binary), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"{target.name}: build failed: {' '.join(command)}\n{result.stderr}")
    return binary


def compile_library_sources(target: Target, cases: Path, source_dir: Path) -> None:
    """The library's other sources (the pool, the streaming reader, the spinning wait, the
    decode step's ops), compiled for ``target`` with the runtime's flags: what the harness
    does not run must still build on every target. A source in ``source_dir`` replaces the
    runtime's own; their shared header (``bf16.h``) comes from ``source_dir`` when it has one."""
    for source in SOURCES:
        if source == SOURCE:
            continue
        path = source_dir / source.name if (source_dir / source.name).exists() else source
        command = [target.compiler, *harness_flags(), *LIBRARY_FLAGS, *target.flags,
                   "-I", str(SOURCE.parent), "-c", str(path), "-o", str(cases / f"{source.stem}.o")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise SystemExit(f"{target.name}: {source.name} does not build: "
                             f"{' '.join(command)}\n{result.stderr}")


def run(target: Target, binary: Path, case_files: list[Path]) -> bool:
    """Runs the harness; prints its report; True when every case passed or was skipped."""
    command = [*target.runner, str(binary), *map(str, case_files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    print(f"== {target.name}: {' '.join(target.runner)} harness ({' '.join(target.flags)})")
    print(result.stdout + result.stderr, end="")
    if result.returncode not in (0, 1):
        print(f"   crashed with status {result.returncode}")
    return result.returncode == 0


def selected(names: list[str] | None) -> list[Target]:
    if not names:
        return [t for t in TARGETS if t.host_arch in (platform.machine(), "any")]
    known = {t.name: t for t in TARGETS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown target {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", help="a target (repeat); default all")
    parser.add_argument("--source-dir", type=Path, default=SOURCE.parent,
                        help="directory of the matvec.c to test (default: the runtime's)")
    args = parser.parse_args(argv)
    targets = selected(args.target)
    missing = sorted({tool for t in targets for tool in t.tools() if not shutil.which(tool)})
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install gcc-aarch64-linux-gnu "
              "libc6-dev-arm64-cross qemu-user (as .ci/run does)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="edgetp-kernel-harness-") as tmp:
        cases = Path(tmp)
        count = write_cases(cases, args.source_dir / SOURCE.name)
        case_files = sorted(cases.glob("*.case"))
        print(f"{count} cases from tests/kernels/kernel_cases.py")
        results = {t.name: run(t, build(t, cases, args.source_dir), case_files) for t in targets}
    print("summary: " + ", ".join(f"{n} {'ok' if ok else 'FAILED'}" for n, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
