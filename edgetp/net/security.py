"""Who may join: CURVE key pairs, encryption of every link, and ZAP authentication.

``edgetp keys --out DIR --name NAME`` writes ``NAME.key`` (public, share it) and
``NAME.key_secret`` (keep it on that device). The master is a CURVE server with its own key
pair and accepts only clients whose public keys are in its ``authorized`` directory (ZAP);
a worker is a CURVE client that knows the master's public key, so it talks to no one else.
Every frame on an encrypted link is unreadable to a passive listener. The allreduce's data
link, a plain TCP connection, is sealed with keys agreed over this channel for that
connection (edgetp.net.linkkeys, edgetp.net.sealedlink).

The ring allreduce's sockets use the same keys: each rank's listener is a CURVE server with
its node's key pair that admits only the cluster's keys (the master's and the authorized
workers', which the master's welcome lists), and each rank connects to its successor knowing
the successor's public key (the master saw it when ZAP admitted that worker). Without keys a
ring listener admits only the holder of a random token it announced (ZeroMQ's PLAIN
mechanism: no encryption, but nobody else can queue messages there). A listener knows whom it
admits from the moment it listens: ZeroMQ does not retry a connection ZAP refused once.

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
PLAIN_USER = "edgetp"  # the user name of a token-admitted (PLAIN) connection


class _AllowedKeys:
    """The CURVE client keys (z85) a socket admits; ZAP asks :meth:`callback` per connection."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def _zap_domain(sock: zmq.Socket) -> tuple[ThreadAuthenticator, str]:
    """The ZAP handler of ``sock``'s context (started once) and a new domain for ``sock``: each
    socket keeps its own list, so several masters in one process (tests, a server restarting
    its cluster) and a ring listener beside a master do not mix them."""
    context = sock.context
    with _AUTH_LOCK:
        auth = _AUTHENTICATORS.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context, log=logging.getLogger("edgetp.zap"))
            auth.start()
            _AUTHENTICATORS[id(context)] = auth
    domain = f"edgetp-{uuid.uuid4().hex}"
    sock.zap_domain = domain.encode()
    return auth, domain


def admit_keys(sock: zmq.Socket, keys: frozenset[bytes]) -> None:
    """Accept on ``sock`` (a CURVE server; call before bind) only clients whose public key
    (z85) is one of ``keys``."""
    auth, domain = _zap_domain(sock)
    auth.configure_curve_callback(domain=domain, credentials_provider=_AllowedKeys(keys))


def authorized_keys(authorized_dir: Path) -> frozenset[bytes]:
    """The public keys (z85) of the invited workers: every ``*.key`` in ``authorized_dir``."""
    paths = list(authorized_dir.glob("*.key")) if authorized_dir.is_dir() else []
    if not paths:
        raise SecurityError(
            f"no worker public keys (*.key) in {authorized_dir}; copy each worker's NAME.key "
            "there (create them with `edgetp keys` on each worker)"
        )
    return frozenset(KeyPair.load(path).public for path in paths)


def authorize(sock: zmq.Socket, authorized_dir: Path) -> frozenset[bytes]:
    """Accept on ``sock`` only CURVE clients whose public key is in ``authorized_dir`` (ZAP;
    the directory is read now); the keys admitted."""
    keys = authorized_keys(authorized_dir)
    admit_keys(sock, keys)
    return keys


def require_token(sock: zmq.Socket, token: str) -> None:
    """Accept on ``sock`` only clients that present ``token`` (PLAIN: in clear, no encryption;
    for the ring of a cluster without keys). Call before bind."""
    auth, domain = _zap_domain(sock)
    auth.configure_plain(domain=domain, passwords={PLAIN_USER: token})
    sock.plain_server = True


def present_token(sock: zmq.Socket, token: str) -> None:
    """Present ``token`` to a :func:`require_token` server (call before connect)."""
    sock.plain_username = PLAIN_USER.encode()
    sock.plain_password = token.encode()


def client_key(frame: zmq.Frame) -> str:
    """The CURVE public key (z85) ZAP verified for the sender of ``frame``; "" without CURVE."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return ""
    return user if isinstance(user, str) and len(user) == 40 else ""


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
