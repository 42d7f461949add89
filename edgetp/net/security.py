"""Who may join: CURVE key pairs, encryption of every link, and ZAP authentication.

``edgetp keys --out DIR --name NAME`` writes ``NAME.key`` (public, share it) and
``NAME.key_secret`` (keep it on that device). The master is a CURVE server with its own key
pair and accepts only clients whose public keys are in its ``authorized`` directory (ZAP);
a worker is a CURVE client that knows the master's public key, so it talks to no one else.
Every frame on an encrypted link is unreadable to a passive listener.

Security is on by default for any non-loopback address; turning it off is an explicit choice
(``--insecure``) and the master logs a warning when it is off on a non-loopback address.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edgetp.core.errors import SecurityError

log = logging.getLogger("edgetp.net.security")

_LOOPBACK = re.compile(r"^tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+$")


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes | None

    @classmethod
    def load(cls, path: str | Path) -> KeyPair:
        """Read a ``.key`` (public only) or ``.key_secret`` (both) certificate file."""
        path = Path(path)
        if not path.is_file():
            raise SecurityError(f"key file {path} not found; create one with `edgetp keys`")
        try:
            public, secret = zmq.auth.load_certificate(str(path))
        except (ValueError, OSError) as exc:
            raise SecurityError(f"{path} is not a CURVE certificate ({exc})") from exc
        return cls(public, secret)


@dataclass(frozen=True)
class MasterSecurity:
    """The master's key pair and the directory of authorized worker public keys."""

    keys: KeyPair
    authorized_dir: Path


@dataclass(frozen=True)
class WorkerSecurity:
    """A worker's key pair and the one master public key it trusts."""

    keys: KeyPair
    master_public: bytes


def create_keys(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into out_dir; refuse to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise SecurityError(f"{public} or {secret} already exists; choose another --name")
    zmq.auth.create_certificates(str(out), name)
    secret.chmod(0o600)
    return public, secret


def is_loopback(address: str) -> bool:
    return bool(_LOOPBACK.match(address))


_AUTHENTICATORS: dict[int, ThreadAuthenticator] = {}  # one ZAP handler per context
_AUTH_LOCK = threading.Lock()


def authorize(sock: zmq.Socket, authorized_dir: Path) -> None:
    """Accept on ``sock`` only CURVE clients whose public key is in ``authorized_dir`` (ZAP).

    Each socket gets its own ZAP domain, so several masters in one process (tests, a server
    restarting its cluster) keep separate lists.
    """
    if not authorized_dir.is_dir() or not list(authorized_dir.glob("*.key")):
        raise SecurityError(
            f"no worker public keys (*.key) in {authorized_dir}; copy each worker's NAME.key "
            "there (create them with `edgetp keys` on each worker)"
        )
    context = sock.context
    with _AUTH_LOCK:
        auth = _AUTHENTICATORS.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context, log=logging.getLogger("edgetp.zap"))
            auth.start()
            _AUTHENTICATORS[id(context)] = auth
    domain = f"edgetp-{uuid.uuid4().hex}"
    auth.configure_curve(domain=domain, location=str(authorized_dir))
    sock.zap_domain = domain.encode()


def make_server(sock: zmq.Socket, keys: KeyPair) -> None:
    """Encrypt ``sock`` as a CURVE server (call before bind)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:
    """Encrypt ``sock`` as a CURVE client of the server with ``server_public`` (before connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def warn_if_insecure(bind: str, secure: bool) -> None:
    if not secure and not is_loopback(bind):
        log.warning("security is OFF on %s: any device on the network can join this cluster "
                    "and read its traffic; use --keys/--authorized (see `edgetp keys`)", bind)
