"""The transport's link-delay hook: a send-side sleep for emulated links (testbeds).

The testbeds (``edgetp.ops``) set ``EDGETP_LINK_DELAY_MS`` / ``EDGETP_LINK_JITTER_MS`` for the
nodes they start; each transport reads them once (:meth:`LinkDelay.from_env`) and sleeps one
traversal before sending a data message. Unset or zero, the hook is :data:`NO_DELAY` and
costs nothing. The environment is read in :meth:`LinkDelay.from_env` alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

from edgetp.core import settings

DELAYED_OPS = frozenset({"step", "sum", "partial"})  # the data messages of a token


class LinkDelay:
    """The send-side delay of the transport hook; :data:`NO_DELAY` when it is off."""

    def __init__(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, seed: int | None = None):
        self.delay_s = delay_ms / 1000
        self.jitter_s = jitter_ms / 1000
        self._random = random.Random(seed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LinkDelay:
        """Read ``EDGETP_LINK_DELAY_MS`` / ``EDGETP_LINK_JITTER_MS`` (unset or 0: no delay)."""
        delay_ms, jitter_ms = settings.link_delay_ms(environ)
        if delay_ms == 0 and jitter_ms == 0:
            return NO_DELAY
        return cls(delay_ms, jitter_ms)

    @property
    def active(self) -> bool:
        return self.delay_s > 0 or self.jitter_s > 0

    def before_send(self, op: str) -> None:
        """Sleep one traversal's delay if ``op`` is a data message (see :data:`DELAYED_OPS`)."""
        if op in DELAYED_OPS and self.active:
            jitter = self._random.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0
            time.sleep(max(0.0, self.delay_s + jitter))


NO_DELAY = LinkDelay()
