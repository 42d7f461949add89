"""Rendering chat templates in child processes, each render bounded: :class:`TemplateRenderer`.

The children run :mod:`edgetp.model.template_sandbox` (memory and CPU limits, output cut at
``max_chars``). A render that gives no answer within its deadline has its child killed; a
child that died (out of CPU time, or killed) is replaced at the next render. At most
``processes`` renders run at once; the others wait for a child. Children are started when
first needed and end when this process closes their input (on :meth:`close`, or at its exit).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import edgetp
from edgetp.model.template_sandbox import HEADER, encode_message

DEADLINE_S = 10.0  # wall-clock seconds a render may take
STARTUP_S = 60.0  # a child's start (importing jinja2 on a loaded machine)
MAX_CHARS = 16 << 20  # characters a render may output
PACKAGE_ROOT = Path(edgetp.__file__).resolve().parent.parent
CHILD_CODE = ("import sys; sys.path.insert(0, {root!r}); "
              "from edgetp.model.template_sandbox import main; main()")


class RenderFailed(Exception):
    """A render failed; ``too_long`` when its output passed ``max_chars``."""

    def __init__(self, message: str, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


class _Child:
    """One sandbox process and the pipes to it."""

    def __init__(self) -> None:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE.format(root=str(PACKAGE_ROOT))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=PACKAGE_ROOT)
        except OSError as exc:
            raise RenderFailed(f"cannot start the chat template renderer: {exc}") from exc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        try:
            self.receive(time.monotonic() + STARTUP_S, "start")
        except BaseException:
            self.kill()
            raise

    def ask(self, request: dict[str, Any], deadline_s: float) -> dict[str, Any]:
        try:
            self.stdin.write(encode_message(request))
            self.stdin.flush()
        except OSError as exc:
            raise RenderFailed(f"the chat template renderer is gone ({exc})") from exc
        return self.receive(time.monotonic() + deadline_s, f"render in {deadline_s:g} s")

    def receive(self, deadline: float, what: str) -> dict[str, Any]:
        (length,) = HEADER.unpack(self._read(HEADER.size, deadline, what))
        return json.loads(self._read(length, deadline, what))  # type: ignore[no-any-return]

    def _read(self, size: int, deadline: float, what: str) -> bytes:
        data = b""
        fd = self.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise RenderFailed(f"the chat template did not {what}")
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise RenderFailed(f"the chat template did not {what}: its process ended "
                                   f"(status {self.proc.poll()}: out of CPU time or memory)")
            data += chunk
        return data

    def kill(self) -> None:
        self.proc.kill()
        self.close()

    def close(self) -> None:
        for stream in (self.stdin, self.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TemplateRenderer:
    """Chat templates rendered by at most ``processes`` sandboxed children at a time."""

    def __init__(self, processes: int = 2) -> None:
        self.processes = processes
        self._idle: list[_Child] = []
        self._live = 0
        self._lock = threading.Condition()

    def render(self, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
               variables: dict[str, str], max_chars: int = MAX_CHARS,
               deadline_s: float = DEADLINE_S) -> str:
        """The template's text for ``messages``; raises :class:`RenderFailed`."""
        request = {"template": template, "messages": messages,
                   "add_generation_prompt": add_generation_prompt, "variables": variables,
                   "max_chars": max_chars, "cpu_s": deadline_s}
        child = self._acquire()
        try:
            reply = child.ask(request, deadline_s)
        except BaseException:
            child.kill()
            self._release(None)
            raise
        self._release(child)
        if "error" in reply:
            raise RenderFailed(reply["error"], reply.get("kind") == "too_long")
        return str(reply["text"])

    def close(self) -> None:
        """End the idle children (a busy one ends when its render does)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._lock.notify_all()
        for child in idle:
            child.close()

    def _acquire(self) -> _Child:
        """An idle child that is still running, or a new one."""
        with self._lock:
            while True:
                while not self._idle and self._live >= self.processes:
                    self._lock.wait()
                if not self._idle:
                    break
                child = self._idle.pop()
                if child.proc.poll() is None:
                    return child
                self._live -= 1  # ended while idle (killed by someone): start another
                child.close()
            self._live += 1
        try:
            return _Child()
        except BaseException:
            self._release(None)
            raise

    def _release(self, child: _Child | None) -> None:
        """Return ``child`` to the idle ones; None: a child ended."""
        ended = child is None or child.proc.poll() is not None
        if child is not None and ended:
            child.close()
        with self._lock:
            if ended:
                self._live -= 1
            else:
                self._idle.append(child)  # type: ignore[arg-type]  # not None when not ended
            self._lock.notify_all()


RENDERER = TemplateRenderer()
