"""Per-connection keys of the encrypted data link, and the cipher that seals its messages.

With the cluster's CURVE keys the data link (edgetp.net.datalink) is sealed with keys of its
own, agreed for that one connection over the ZeroMQ channel that CURVE already encrypts and
authenticates with both long-term keys:

1. the worker's ``hello`` carries a fresh X25519 public key (:class:`KeyOffer`) and the
   ciphers it runs fast (:func:`preferred_ciphers`); only the master can read it, and ZAP has
   checked the worker's long-term key before the master sees it;
2. the master answers with its own fresh X25519 public key and the cipher it chose
   (:func:`choose_cipher`) in its ``welcome``, which only that worker can read;
3. each side computes the X25519 shared secret and expands it with HKDF-SHA256 into one key
   per direction, with both long-term public keys, both fresh public keys, the cipher, the
   master's session and the link's token in the HKDF info (:class:`LinkBinding`), so the keys
   belong to this pair of nodes and this connection only.

Every message is then sealed with an AEAD (:class:`LinkCipher`): AES-256-GCM where both nodes
have AES instructions (x86 AES-NI, ARMv8 crypto extensions), ChaCha20-Poly1305 otherwise; the
nonce is the message's counter, one counter per direction, so a message replayed, reordered,
dropped or altered fails. The fresh private keys are dropped once the keys are derived, and
the keys with the link (:meth:`LinkCipher.forget`). The primitives are the ``cryptography``
package's (OpenSSL); nothing here is home-made cryptography.
"""

from __future__ import annotations

import platform
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgetp.core.errors import EdgetpError

AES_GCM, CHACHA20 = "aes-256-gcm", "chacha20-poly1305"
CIPHERS = (AES_GCM, CHACHA20)
TAG_BYTES = 16  # both ciphers' authentication tag
KEY_BYTES = 32
PUBLIC_HEX_CHARS = 64  # an X25519 public key, hex
MAX_COUNTER = 2**64 - 1
HKDF_SALT = b"edgetp data link keys v1"
_NONCE = struct.Struct("<4xQ")  # 12 bytes: four zero bytes, the counter


class LinkKeyError(EdgetpError):
    """The data link's key exchange or a sealed message failed (the link is not used)."""


def cpu_has_aes(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AES instructions: the ``aes`` flag (x86) or feature (ARM) in
    /proc/cpuinfo; without it (not Linux), whether the machine is one that always has them
    (Apple's arm64)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return "aes" in value.split()
    except OSError:
        pass
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def preferred_ciphers(has_aes: bool | None = None) -> list[str]:
    """This node's ciphers, fastest first: AES-GCM with AES instructions (about 5x faster
    than ChaCha20 with them), ChaCha20-Poly1305 without (AES in software is slow, and not
    constant-time)."""
    aes = cpu_has_aes() if has_aes is None else has_aes
    return [AES_GCM, CHACHA20] if aes else [CHACHA20, AES_GCM]


def choose_cipher(worker_ciphers: str, master_ciphers: list[str] | None = None) -> str:
    """The master's choice: AES-GCM when both nodes list it first, else ChaCha20-Poly1305
    (fast everywhere); LinkKeyError if the worker offers neither."""
    offered = worker_ciphers.split()
    if not set(offered) & set(CIPHERS):
        raise LinkKeyError(f"the worker offers no cipher this master runs ({worker_ciphers!r})")
    mine = preferred_ciphers() if master_ciphers is None else master_ciphers
    if offered[0] == AES_GCM and mine[0] == AES_GCM:
        return AES_GCM
    return CHACHA20 if CHACHA20 in offered else AES_GCM


class KeyOffer:
    """One side's fresh X25519 key pair for one connection; its private half is dropped
    once :meth:`agree` has run."""

    def __init__(self) -> None:
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)
        self.public_hex = raw.hex()

    def agree(self, peer_public_hex: str) -> bytes:
        """The shared secret with the peer's offer (once; the private key is then gone)."""
        if self._private is None:
            raise LinkKeyError("this key offer was used already")
        try:
            peer = X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public_hex))
            secret = self._private.exchange(peer)
        except ValueError as exc:  # not hex, not 32 bytes, or a low-order point
            raise LinkKeyError(f"the peer's data-link key is not an X25519 key ({exc})") from exc
        finally:
            self._private = None
        return secret


@dataclass(frozen=True)
class LinkBinding:
    """What the keys of one data link are bound to (all of it goes into HKDF's info)."""

    cipher: str
    session: str  # the master's session id
    token: str  # the worker's data-link token
    master_key: str  # the master's long-term CURVE public key, z85
    worker_key: str  # the worker's long-term CURVE public key, z85 (as ZAP verified it)
    master_offer: str  # the master's fresh X25519 public key, hex
    worker_offer: str  # the worker's, hex

    def info(self) -> bytes:
        fields = (self.cipher, self.session, self.token, self.master_key, self.worker_key,
                  self.master_offer, self.worker_offer)
        return b"\0".join(field.encode() for field in fields)


@dataclass(frozen=True)
class LinkKeys:
    """The two keys of a link: what the master sends with, what the worker sends with."""

    cipher: str
    master_to_worker: bytes
    worker_to_master: bytes


def derive_keys(offer: KeyOffer, peer_offer: str, binding: LinkBinding) -> LinkKeys:
    """Both directions' keys from our offer, the peer's public key and the binding."""
    if binding.cipher not in CIPHERS:
        raise LinkKeyError(f"unknown data-link cipher {binding.cipher!r}")
    if len(peer_offer) != PUBLIC_HEX_CHARS:
        raise LinkKeyError(f"a data-link key of {len(peer_offer)} hex digits, not "
                           f"{PUBLIC_HEX_CHARS}")
    secret = offer.agree(peer_offer)
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=HKDF_SALT,
               info=binding.info()).derive(secret)
    return LinkKeys(binding.cipher, okm[:KEY_BYTES], okm[KEY_BYTES:])


class LinkCipher:
    """One end's sealing state: the key and counter of each direction.

    ``peer`` names the other end for errors. Each sealed message uses the next send counter
    as its nonce; each opened one must carry exactly the next receive counter.
    """

    def __init__(self, keys: LinkKeys, is_master: bool, peer: str) -> None:
        make = AESGCM if keys.cipher == AES_GCM else ChaCha20Poly1305
        send, receive = ((keys.master_to_worker, keys.worker_to_master) if is_master
                         else (keys.worker_to_master, keys.master_to_worker))
        self.cipher = keys.cipher
        self.peer = peer
        self._send: AESGCM | ChaCha20Poly1305 | None = make(send)
        self._receive: AESGCM | ChaCha20Poly1305 | None = make(receive)
        self.sent = 0  # the counter of the next message sealed
        self.received = 0  # the counter the next message opened must carry

    def seal_into(self, counter: int, header: bytes, data: memoryview | bytes,
                  out: bytearray | memoryview) -> None:
        """Encrypt ``data`` into ``out`` (``len(data) + TAG_BYTES``) as message ``counter``
        (:attr:`sent`, which ``header`` carries), authenticating ``header`` too."""
        if self._send is None:
            raise LinkKeyError(f"the data link with {self.peer} is closed")
        if counter != self.sent or counter >= MAX_COUNTER:
            raise LinkKeyError(f"data-link message {counter} to {self.peer} is not the next "
                               f"one ({self.sent})")
        self._send.encrypt_into(_NONCE.pack(counter), data, header, out)
        self.sent = counter + 1

    def open_into(self, counter: int, header: bytes | bytearray, sealed: memoryview,
                  out: memoryview) -> None:
        """Decrypt ``sealed`` into ``out`` if it is the next message and authentic; else
        LinkKeyError naming the peer (``out`` must then not be used)."""
        if self._receive is None:
            raise LinkKeyError(f"the data link with {self.peer} is closed")
        if counter != self.received:
            what = ("replayed" if counter < self.received
                    else "messages before it are missing or reordered")
            raise LinkKeyError(f"data-link message {counter} from {self.peer} where "
                               f"{self.received} was due ({what}); the link is closed")
        try:
            self._receive.decrypt_into(_NONCE.pack(counter), sealed, header, out)
        except InvalidTag:
            raise LinkKeyError(f"data-link message {counter} from {self.peer} failed "
                               "authentication (altered, truncated, or not sealed with this "
                               "link's key); the link is closed") from None
        self.received = counter + 1

    def forget(self) -> None:
        """Drop both keys (the link closed)."""
        self._send = self._receive = None


def master_link_keys(hello: dict[str, Any], master_key: str, worker_key: str, session: str
                     ) -> tuple[LinkKeys, dict[str, str]]:
    """The master's side of the exchange, from a worker's ``hello``: the link's keys and the
    welcome's fields that give the worker its side (LinkKeyError if the hello's are unfit)."""
    if not worker_key:
        raise LinkKeyError("the worker's long-term key is unknown (no CURVE)")
    cipher = choose_cipher(hello["data_ciphers"])
    offer = KeyOffer()
    binding = LinkBinding(cipher, session, hello["data_token"], master_key, worker_key,
                          offer.public_hex, hello["data_key"])
    keys = derive_keys(offer, hello["data_key"], binding)
    return keys, {"data_key": offer.public_hex, "data_cipher": cipher}


def worker_link_keys(offer: KeyOffer, welcome: dict[str, Any], master_key: str,
                     worker_key: str, token: str) -> LinkKeys:
    """The worker's side: the link's keys from its ``offer`` and the master's ``welcome``."""
    binding = LinkBinding(welcome["data_cipher"], welcome["session"], token, master_key,
                          worker_key, welcome["data_key"], offer.public_hex)
    return derive_keys(offer, welcome["data_key"], binding)
