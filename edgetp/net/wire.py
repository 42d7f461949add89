"""Message encoding: a versioned msgpack header frame followed by raw tensor frames.

Nothing is ever unpickled. Every field of a header is checked against the op's schema, every
tensor's dtype and shape against its payload's length, and sizes against fixed limits, so a
malformed or hostile message raises :class:`WireError` and nothing else.

Frames on the wire (after ZeroMQ's own routing frames)::

    [header: msgpack map] [tensor 0 bytes] [tensor 1 bytes] ...

The header's ``tensors`` entry lists ``[dtype, shape]`` for each tensor frame, in order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from edgetp.core.errors import EdgetpError
from edgetp.net.codec import scale_shape

PROTOCOL_VERSION = 9  # bump whenever a schema or a tensor layout below changes (6: int8 on the
# wire in blocks of 64 with each block's largest value exact; 7: the data link's keys,
# DATA_LINK_KEY_FIELDS below; 8: a step's KV slots and start positions, one per sequence;
# 9: with two ranks the master sends its own partial on the data link, not the sum)
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 4
MAX_DIMS = 4
MAX_LIST_INTS = 256  # a step's sequences (a decode batch has far fewer)

WIRE_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "i8": torch.int8,
    "f64": torch.float64,
}
DTYPE_CODES = {v: k for k, v in WIRE_DTYPES.items()}



class IntList(list):
    """A header field's type: a list of 1 to MAX_LIST_INTS integers in [0, 2**62)."""


# op -> {field: type}; every field listed is required, no other field is allowed.
_INT, _STR, _FLOAT, _DICT, _BOOL, _INTS = int, str, float, dict, bool, IntList
SCHEMAS: dict[str, dict[str, type]] = {
    "hello": {"rank": _INT, "fingerprint": _STR, "plan": _STR, "dtype": _STR, "pid": _INT,
              "host": _STR, "version": _STR, "time": _FLOAT, "data_port": _INT,
              "data_token": _STR, "kv_slots": _INT},
    "welcome": {"session": _STR, "wire_dtype": _STR, "time": _FLOAT, "allreduce": _STR,
                "ring_port": _INT, "ring_keys": _STR, "data": _BOOL},
    # the ring: a worker's listener (after a welcome choosing it; ring_keys: the keys it
    # admits, space-separated), then (from the master) where its successor listens and the
    # key (CURVE) or token (no keys) that admits it there
    "ring_open": {"port": _INT, "token": _STR},
    "link": {"address": _STR, "key": _STR, "token": _STR},
    "ring": {"seq": _INT, "step": _INT, "index": _INT, "hop": _INT},
    "refuse": {"reason": _STR},
    "rejoin": {},
    # one sequence's T rows (slots and starts of one entry: its KV slot, its first row's
    # position), or a decode batch of T sequences, a row each (T entries)
    "step": {"seq": _INT, "step": _INT, "slots": _INTS, "starts": _INTS},
    "partial": {"seq": _INT, "step": _INT, "index": _INT},
    "sum": {"seq": _INT, "step": _INT, "index": _INT},
    "abort": {"seq": _INT},
    "ping": {"time": _FLOAT},
    "pong": {"time": _FLOAT, "echo": _FLOAT},
    "collect": {"seq": _INT},
    "stats": {"seq": _INT, "stats": _DICT},
    "error": {"message": _STR},
    "health": {"weights": _STR},  # a worker's weight reads: "" when they work, else why not
    "shutdown": {},
}
# The data link's per-connection keys (edgetp.net.linkkeys), "" without CURVE keys: the
# worker's fresh X25519 public key (hex) and its ciphers, fastest first, in its hello; the
# master's fresh key and the cipher it chose in its welcome.
DATA_LINK_KEY_FIELDS: dict[str, dict[str, type]] = {
    "hello": {"data_key": _STR, "data_ciphers": _STR},
    "welcome": {"data_key": _STR, "data_cipher": _STR},
}
for _op, _fields in DATA_LINK_KEY_FIELDS.items():
    SCHEMAS[_op].update(_fields)
TENSOR_COUNTS: dict[str, tuple[int, int]] = {
    "step": (1, 1), "partial": (1, 2), "sum": (1, 2), "stats": (1, 1), "ring": (1, 2),
}
# two tensors: int8 codes [T, d], float32 scales [T, ceil(d / 64), 2] (edgetp.net.codec)
SCALED_OPS = ("partial", "sum", "ring")

warnings.filterwarnings("ignore", message="The given buffer is not writable")


class WireError(EdgetpError, ValueError):
    """A message that does not follow the protocol; it is dropped, never acted on."""


@dataclass
class Message:
    op: str
    fields: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)


def encode(op: str, fields: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> list[Any]:
    """Frames for one message: the header bytes, then each tensor's memory (no copy)."""
    specs, payloads = [], []
    for tensor in tensors:
        if tensor.dtype not in DTYPE_CODES:
            raise WireError(f"tensor dtype {tensor.dtype} cannot be sent")
        specs.append([DTYPE_CODES[tensor.dtype], list(tensor.shape)])
        payloads.append(tensor_bytes(tensor))
    header = {"v": PROTOCOL_VERSION, "op": op, "tensors": specs, **fields}
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes, without a copy when it is contiguous (as sent)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)  # numpy has no bfloat16: the same two bytes
    return tensor.numpy().data.cast("B")


def decode(frames: Sequence[Any]) -> Message:
    """Parse and validate frames (bytes, memoryviews or zmq Frames) into a :class:`Message`."""
    if not frames:
        raise WireError("empty message")
    header = _unpack_header(_buffer(frames[0]))
    op = header.pop("op", None)
    if not isinstance(op, str) or op not in SCHEMAS:  # an unhashable op would raise TypeError
        raise WireError(f"unknown op {op!r}")
    specs = header.pop("tensors", None)
    _check_fields(op, header)
    tensors = _decode_tensors(op, specs, frames[1:])
    return Message(op, header, tensors)


def _buffer(frame: Any) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer
    return memoryview(frame)


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    version = header.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1.0 == 1 in Python
        raise WireError(f"protocol version {version!r} is not {PROTOCOL_VERSION}; "
                        "run the same edgetp version on every node")
    return header


def _check_fields(op: str, header: dict[str, Any]) -> None:
    schema = SCHEMAS[op]
    extra = set(header) - set(schema)
    if extra:
        raise WireError(f"{op}: unexpected fields {sorted(extra)}")
    for name, kind in schema.items():
        value = header.get(name)
        if kind is _INTS:
            _check_ints(op, name, value)
            continue
        if kind is _FLOAT and isinstance(value, int) and not isinstance(value, bool):
            header[name] = value = float(value)
        if not isinstance(value, kind) or (kind is _INT and isinstance(value, bool)):
            raise WireError(f"{op}: field {name!r} must be {kind.__name__}")
        if kind is _INT and not (isinstance(value, int) and 0 <= value < 2**62):
            raise WireError(f"{op}: field {name!r} out of range")


def _check_ints(op: str, name: str, value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST_INTS:
        raise WireError(f"{op}: field {name!r} must be a list of 1 to {MAX_LIST_INTS} integers")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < 2**62:
            raise WireError(f"{op}: field {name!r} holds {item!r}, not an integer in range")


def _decode_tensors(op: str, specs: Any, payloads: Sequence[Any]) -> list[torch.Tensor]:
    low, high = TENSOR_COUNTS.get(op, (0, 0))
    if not isinstance(specs, list) or not low <= len(specs) <= min(high, MAX_TENSORS):
        raise WireError(f"{op}: expected {low}..{high} tensors")
    if len(specs) != len(payloads):
        raise WireError(f"{op}: header lists {len(specs)} tensors but {len(payloads)} frames came")
    pairs = zip(specs, payloads, strict=True)  # equal lengths: checked above
    tensors = [_decode_tensor(op, spec, payload) for spec, payload in pairs]
    if len(tensors) == 2 and op in SCALED_OPS:
        _check_scaled(op, *tensors)
    return tensors


def _check_scaled(op: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """An int8 activation: codes [..., d] int8 and float32 scales per block, [..., nb]."""
    if codes.dtype != torch.int8 or scale.dtype != torch.float32:
        raise WireError(f"{op}: two tensors must be int8 codes and float32 scales")
    if tuple(scale.shape) != scale_shape(codes.shape):
        raise WireError(f"{op}: scales of shape {list(scale.shape)} for codes of shape "
                        f"{list(codes.shape)}; expected {list(scale_shape(codes.shape))}")


def _decode_tensor(op: str, spec: Any, payload: Any) -> torch.Tensor:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
            and spec[0] in WIRE_DTYPES
            and isinstance(spec[1], list) and 1 <= len(spec[1]) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31
                    for d in spec[1])):
        raise WireError(f"{op}: malformed tensor spec {spec!r:.80}")
    dtype, shape = WIRE_DTYPES[spec[0]], spec[1]
    itemsize = dtype.itemsize
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise WireError(f"{op}: tensor of {nbytes} bytes exceeds {MAX_TENSOR_BYTES}")
    data = _buffer(payload)
    if len(data) != nbytes:
        raise WireError(f"{op}: shape {shape} {spec[0]} needs {nbytes} bytes, got {len(data)}")
    if dtype == torch.bfloat16:
        return torch.frombuffer(data, dtype=torch.int16).view(torch.bfloat16).view(shape)
    return torch.frombuffer(data, dtype=dtype).view(shape)
