"""Instructions per weight byte of each decode kernel, per target, counted under qemu.

Run::

    .venv/bin/python benchmarks/kernel_instructions.py [--target NAME ...] [--json]

qemu cannot time an AArch64 build, but it can count what one executes: each target's build of
``edgetp/kernels/csrc/matvec.c`` (the targets of ``tests/kernels/run_harness.py``; the x86 ones
under ``qemu-x86_64 -cpu max``, which has AVX2 but not AVX-512) runs one product on
[64, 1024] and one on [128, 1024] weights with qemu translating one instruction per block and
logging every block it executes (``-singlestep -d nochain,exec``); the difference, over the
extra 64 rows' weight bytes, is the kernel's instructions per weight byte with the fixed costs
(quantizing x, the call) taken out. The driver's own set-up code (``main``) is not counted.
Needs the tools ``make test-kernels`` needs, and ``qemu-x86_64`` (Debian's ``qemu-user``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))
sys.path.insert(0, str(ROOT))

from run_harness import QEMU, TARGETS, Target, harness_flags  # noqa: E402

from edgetp.kernels.native import SOURCE  # noqa: E402

PRODUCTS = {"f32": 4.0, "bf16": 2.0, "i8": 1.0, "i8_b32": 1.0, "i4": 0.5}  # weight bytes/param
COLS, FEW, MANY = 1024, 64, 128

DRIVER = r"""
#include "matvec.c"
#include <stdio.h>
int main(int argc, char **argv) {
    const char *k = argv[1];
    int64_t rows = atoll(argv[2]), cols = atoll(argv[3]);
    size_t n = (size_t)rows * cols;
    unsigned char *w = calloc(n * 4 + 64, 1);
    uint16_t *s = calloc(n + 64, 4), *xb = calloc(cols + 64, 2);
    float *x = calloc(cols + 64, 4), *y = calloc(rows + 64, 4);
    for (int64_t i = 0; i < cols; i++) x[i] = (float)((i * 7919) % 200 - 100) / 50.f;
    for (int64_t i = 0; i < cols; i++) xb[i] = 0x3f80;
    for (size_t i = 0; i < n * 4; i++) w[i] = (unsigned char)((i * 2654435761u) >> 13) & 0x3f;
    for (size_t i = 0; i < n; i++) s[i] = 0x3c00;
    int r = 0;
    if (!strcmp(k, "f32")) et_matvec_f32((float *)w, x, y, rows, cols);
    else if (!strcmp(k, "bf16")) r = et_matvec_bf16((uint16_t *)w, xb, (uint16_t *)y, rows, cols);
    else if (!strcmp(k, "i8")) r = et_matvec_i8((int8_t *)w, s, x, y, rows, cols);
    else if (!strcmp(k, "i8_b32")) r = et_matvec_i8_b32((int8_t *)w, s, x, y, rows, cols);
    else if (!strcmp(k, "i4")) r = et_matvec_i4(w, s, x, y, rows, cols, 32);
    printf("%s %d %g\n", k, r, (double)y[0]);
    return r;
}
"""


def runner(target: Target) -> list[str]:
    if target.runner:
        return [*target.runner, "-singlestep", "-d", "nochain,exec"]
    return ["qemu-x86_64", "-cpu", "max", "-singlestep", "-d", "nochain,exec"]


def build(target: Target, work: Path) -> Path:
    (work / "driver.c").write_text(DRIVER)
    binary = work / f"driver-{target.name}"
    flags = [*harness_flags(), *target.flags]
    if "-static" not in flags:
        flags.append("-static")  # qemu-x86_64 then needs no loader
    subprocess.run([target.compiler, *flags, "-I", str(SOURCE.parent), str(work / "driver.c"),
                    "-o", str(binary), "-lm"], check=True, timeout=300)
    return binary


def executed(target: Target, binary: Path, product: str, rows: int, log: Path) -> int:
    """Instructions executed outside the driver's ``main`` for one product."""
    subprocess.run([*runner(target), "-D", str(log), str(binary), product, str(rows),
                    str(COLS)], check=True, capture_output=True, timeout=600)
    count = 0
    with log.open() as lines:
        for line in lines:
            if line.startswith("Trace") and not line.rstrip().endswith(" main"):
                count += 1
    return count


def per_byte(target: Target, work: Path) -> dict[str, float]:
    binary, log = build(target, work), work / "exec.log"
    out = {}
    for product, size in PRODUCTS.items():
        extra = (executed(target, binary, product, MANY, log)
                 - executed(target, binary, product, FEW, log))
        out[product] = round(extra / ((MANY - FEW) * COLS * size), 3)
    log.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", help="a target (repeat); default: "
                        "x86-64-v3 and every AArch64 one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    known = {t.name: t for t in TARGETS}
    names = args.target or [n for n in known if n == "x86-64-v3" or n.startswith("aarch64")]
    if unknown := [n for n in names if n not in known or n == "native"]:
        raise SystemExit(f"no instruction count for {', '.join(unknown)}; known: "
                         f"{', '.join(n for n in known if n != 'native')} ({QEMU} and "
                         "qemu-x86_64 needed)")
    with tempfile.TemporaryDirectory(prefix="edgetp-kernel-insns-") as tmp:
        counts = {name: per_byte(known[name], Path(tmp)) for name in names}
    if args.json:
        print(json.dumps(counts, indent=1))
        return
    print(f"instructions per weight byte ([{MANY}, {COLS}] minus [{FEW}, {COLS}] weights)")
    print(f"\n| target | {' | '.join(PRODUCTS)} |\n|---" + "|---" * len(PRODUCTS) + "|")
    for name, row in counts.items():
        print(f"| {name} | {' | '.join(str(row[p]) for p in PRODUCTS)} |")


if __name__ == "__main__":
    main()
