"""Deadlines inside a test: a call or a condition that must finish in time fails the test,
saying what hung and where, instead of hanging it (pytest-timeout stops anything else)."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str = "the call") -> T:
    """``fn()``, run in a thread: its result or its exception; AssertionError with the
    thread's stack if it has not returned within ``timeout_s``."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True, name=f"deadline: {what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        frame = sys._current_frames().get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        raise AssertionError(f"{what} did not finish within {timeout_s:g} s; it hangs in:\n"
                             + stack)
    if "error" in result:
        raise result["error"]
    return result["value"]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)
