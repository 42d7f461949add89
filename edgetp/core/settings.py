"""edgetp.core.settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in ``os.environ`` for the code inside; the previous values restored after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

ENV_DELAY = "EDGETP_LINK_DELAY_MS"
ENV_JITTER = "EDGETP_LINK_JITTER_MS"
ENV_DESCRIPTION = "EDGETP_LINK_EMULATION"
ENV_PROFILE = "EDGETP_LINK_PROFILE"
ENV_PROFILES_FILE = "EDGETP_LINK_PROFILES"
