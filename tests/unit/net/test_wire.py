"""edgetp.net.wire: every op round-trips, and anything malformed raises WireError and nothing
else."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetp.net import wire
from edgetp.net.wire import (
    DTYPE_CODES,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    SCHEMAS,
    TENSOR_COUNTS,
    WIRE_DTYPES,
    WireError,
)

# Readable valid values for the fields of the ops known when this was written; any other op
# gets values made from its schema, so the tests follow the protocol as it grows.
NICE_FIELDS: dict[str, dict[str, Any]] = {
    "hello": {"rank": 1, "fingerprint": "ab" * 16, "plan": '{"n_ranks": 2}', "dtype": "float32",
              "pid": 1234, "host": "node-1", "version": "0.1.0", "time": 1.7e9},
    "welcome": {"session": "f00d", "wire_dtype": "f32", "time": 1.7e9},
    "refuse": {"reason": "the shard is of a different model"},
    "rejoin": {},
    "step": {"seq": 3, "step": 7, "slots": [0], "starts": [12]},
    "partial": {"seq": 3, "step": 7, "index": 5},
    "sum": {"seq": 3, "step": 7, "index": 4},
    "abort": {"seq": 3},
    "ping": {"time": 12.5},
    "pong": {"time": 12.75, "echo": 12.5},
    "stats": {"seq": 3, "stats": {"wait_s": 0.25, "steps": 9, "nested": {"a": [1, 2]}}},
    "error": {"message": "rank 1: out of memory"},
    "shutdown": {},
}
_SAMPLE_VALUES: dict[type, Any] = {int: 3, str: "x", float: 1.5, dict: {"k": [1, "v"]}, bool: True,
                                   wire.IntList: [0, 2]}
CORE_OPS = ["hello", "welcome", "refuse", "rejoin", "step", "partial", "sum", "abort", "ping",
            "pong", "stats", "error", "shutdown"]


def valid_fields(op: str) -> dict[str, Any]:
    nice = NICE_FIELDS.get(op)
    if nice is not None and set(nice) == set(SCHEMAS[op]):
        return dict(nice)
    return {name: _SAMPLE_VALUES[kind] for name, kind in SCHEMAS[op].items()}


VALID_FIELDS = {op: valid_fields(op) for op in SCHEMAS}
TENSOR_OPS = {op: low_high for op, low_high in TENSOR_COUNTS.items() if low_high[1] > 0}
NO_TENSOR_OPS = sorted(op for op in SCHEMAS if op not in TENSOR_OPS)
MULTI_TENSOR_OPS = sorted(op for op, (_, high) in TENSOR_OPS.items() if high >= 2)
# the four the protocol was built on first, then whatever else it supports
DTYPES = list(dict.fromkeys([torch.float32, torch.bfloat16, torch.float16, torch.int8,
                             *WIRE_DTYPES.values()]))
SCALED_OPS = sorted(getattr(wire, "SCALED_OPS", ()))
UNSENDABLE = next(d for d in (torch.complex64, torch.int64, torch.bool, torch.int32)
                  if d not in DTYPE_CODES)


def test_the_core_ops_exist() -> None:
    assert set(CORE_OPS) <= set(SCHEMAS)
    assert {"step", "partial", "sum"} <= set(TENSOR_OPS)
    assert {"f32", "bf16", "f16", "i8"} <= set(WIRE_DTYPES)


def n_tensors(op: str) -> int:
    return TENSOR_COUNTS.get(op, (0, 0))[0]


def valid_tensors(op: str, n: int) -> list[torch.Tensor]:
    """``n`` tensors that ``op`` accepts (a pair on a scaled op is int8 codes + block scales)."""
    if n == 2 and op in SCALED_OPS:
        return [sample_tensor(torch.int8, (3, 4)), torch.rand(3, 1, 2)]
    if n == 2:
        return [sample_tensor(torch.bfloat16, (3, 4)), sample_tensor(torch.int8, (7,))]
    return [sample_tensor(torch.float32, (2, 4)) for _ in range(n)]


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, dtype=torch.int8)
    return torch.randn(shape).to(dtype)


def header(op: str, fields: dict[str, Any] | None = None, tensors: list[Any] | None = None,
           **extra: Any) -> bytes:
    """A raw header frame (bypassing encode, so anything can be put in it)."""
    body = {"v": PROTOCOL_VERSION, "op": op, "tensors": tensors or [],
            **(VALID_FIELDS[op] if fields is None else fields), **extra}
    return msgpack.packb(body, use_bin_type=True)


def as_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_round_trip_of_every_op(op: str) -> None:
    tensors = [sample_tensor(torch.float32, (2, 8))] * n_tensors(op)
    message = wire.decode(wire.encode(op, VALID_FIELDS[op], tensors))
    assert message.op == op
    assert message.fields == VALID_FIELDS[op]
    assert len(message.tensors) == len(tensors)
    for got, sent in zip(message.tensors, tensors, strict=True):
        assert torch.equal(got, sent)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (4, 6), (2, 3, 4), (2, 1, 3, 2)])
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample_tensor(dtype, shape)
    message = wire.decode(wire.encode("sum", VALID_FIELDS["sum"], [tensor]))
    (got,) = message.tensors
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got.view(torch.uint8) if dtype != torch.int8 else got,
                       tensor.view(torch.uint8) if dtype != torch.int8 else tensor)


@pytest.mark.parametrize("op", MULTI_TENSOR_OPS)
def test_two_tensors_of_different_dtypes(op: str) -> None:
    a, b = valid_tensors(op, 2)
    frames = wire.encode(op, VALID_FIELDS[op], [a, b])
    assert len(frames) == 3  # header + one frame per tensor
    message = wire.decode(frames)
    assert torch.equal(message.tensors[0], a) and torch.equal(message.tensors[1], b)


@pytest.mark.parametrize("op", SCALED_OPS)
def test_scaled_pairs_must_be_int8_codes_with_float32_scales_per_block(op: str) -> None:
    codes, scales = sample_tensor(torch.int8, (3, 80)), torch.rand(3, 2, 2)  # blocks 64, 16
    assert len(wire.decode(wire.encode(op, VALID_FIELDS[op], [codes, scales])).tensors) == 2
    for pair in ([codes.float(), scales], [codes, scales.half()], [scales, codes],
                 [codes, torch.rand(3, 1)], [codes, torch.rand(3, 2)], [codes, torch.rand(3, 1, 2)],
                 [codes, torch.rand(3, 3, 2)], [codes, torch.rand(2, 2, 2)],
                 [codes, torch.rand(3, 2, 1)], [codes, torch.rand(12)]):
        rejects(wire.encode(op, VALID_FIELDS[op], pair))


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    tensor = torch.arange(12, dtype=torch.float32).view(3, 4).t()  # [4, 3], not contiguous
    (got,) = wire.decode(wire.encode("step", VALID_FIELDS["step"], [tensor])).tensors
    assert torch.equal(got, tensor)


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(WireError, match="cannot be sent"):
        wire.encode("sum", VALID_FIELDS["sum"], [torch.zeros(2, dtype=UNSENDABLE)])


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "zmq.Frame", "encoded"])
def test_decode_accepts_zmq_like_frames(kind: str) -> None:
    tensor = sample_tensor(torch.float16, (2, 3))
    frames = wire.encode("partial", VALID_FIELDS["partial"], [tensor])
    convert = {
        "bytes": bytes,
        "bytearray": bytearray,
        "memoryview": lambda f: memoryview(bytes(f)),
        "zmq.Frame": lambda f: zmq.Frame(bytes(f)),
        "encoded": lambda f: f,  # encode's own output: bytes header, memoryview payloads
    }[kind]
    message = wire.decode([convert(f) for f in frames])
    assert message.op == "partial" and torch.equal(message.tensors[0], tensor)


def test_decode_over_a_real_zmq_pair() -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://edgetp-test-wire")
        b.connect("inproc://edgetp-test-wire")
        tensor = sample_tensor(torch.bfloat16, (5, 7))
        a.send_multipart(wire.encode("sum", VALID_FIELDS["sum"], [tensor]), copy=False)
        assert b.poll(2000), "no message within 2 s"
        frames = b.recv_multipart(copy=False)
        message = wire.decode(frames)
        assert torch.equal(message.tensors[0], tensor)
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_integer_is_accepted_for_a_float_field() -> None:
    message = wire.decode([header("ping", {"time": 5})])
    assert message.fields == {"time": 5.0} and isinstance(message.fields["time"], float)


# -- rejections -------------------------------------------------------------------------------


def rejects(frames: list[Any], match: str | None = None) -> WireError:
    with pytest.raises(WireError, match=match) as info:
        wire.decode(frames)
    return info.value


@pytest.mark.parametrize(
    "version",
    [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, None, str(PROTOCOL_VERSION),
     float(PROTOCOL_VERSION), float(PROTOCOL_VERSION) + 0.0001, [PROTOCOL_VERSION], True],
)
def test_wrong_version(version: Any) -> None:
    raw = {"v": version, "op": "ping", "tensors": [], "time": 1.0}
    if version is None:
        del raw["v"]
    rejects([msgpack.packb(raw)], "protocol version")


@pytest.mark.parametrize("op", ["PING", "pingg", "", None, 5, 1.5, b"ping", [1, 2], {"a": 1}])
def test_unknown_op(op: Any) -> None:
    raw = {"v": PROTOCOL_VERSION, "op": op, "tensors": [], "time": 1.0}
    rejects([msgpack.packb(raw, use_bin_type=True)], "unknown op")


def test_missing_op() -> None:
    rejects([msgpack.packb({"v": PROTOCOL_VERSION, "tensors": []})], "unknown op")


@pytest.mark.parametrize("op", [op for op in sorted(SCHEMAS) if SCHEMAS[op]])
def test_missing_field(op: str) -> None:
    for name in SCHEMAS[op]:
        fields = {k: v for k, v in VALID_FIELDS[op].items() if k != name}
        rejects([header(op, fields)], repr(name))


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_extra_field(op: str) -> None:
    rejects([header(op, extra_field=1)], "unexpected fields")


@pytest.mark.parametrize(
    ("op", "name", "value"),
    [
        ("step", "seq", True),  # bool is not an int
        ("step", "seq", "3"),
        ("step", "starts", 1),
        ("step", "step", None),
        ("partial", "index", [0]),
        ("abort", "seq", False),
        ("hello", "rank", "1"),
        ("hello", "pid", 12.0),
        ("hello", "fingerprint", 5),
        ("hello", "time", "now"),
        ("hello", "time", True),  # bool is not a float either
        ("welcome", "session", b"f00d"),  # bin is not str
        ("ping", "time", None),
        ("pong", "echo", [1.0]),
        ("stats", "stats", [1, 2]),
        ("error", "message", {"text": "x"}),
        ("refuse", "reason", 0),
    ],
)
def test_wrong_field_type(op: str, name: str, value: Any) -> None:
    rejects([header(op, {**VALID_FIELDS[op], name: value})], f"field '{name}' must be")


@pytest.mark.parametrize("value", [[], [1.0], [True], [-1], [2**62], ["3"], [0] * 257, 5])
def test_a_steps_slots_are_a_short_list_of_integers_in_range(value: Any) -> None:
    rejects([header("step", {**VALID_FIELDS["step"], "slots": value})], "field 'slots'")


@pytest.mark.parametrize("value", [-1, -(2**40), 2**62, 2**64 - 1])
def test_int_out_of_range(value: int) -> None:
    rejects([header("abort", {"seq": value})], "out of range")


@pytest.mark.parametrize("body", [[1, 2, 3], "ping", 5, None, b"\x00", 1.5, True])
def test_header_not_a_map(body: Any) -> None:
    rejects([msgpack.packb(body, use_bin_type=True)], "not a map")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"\xff" * 10, b"\x81", b"\x92\x01", b"hello world", b"\xdf\xff\xff\xff\xff",
     msgpack.packb({"v": 1}) + b"trailing", msgpack.packb({1: "int key"}),
     msgpack.packb({(1, 2): "x"})],
)
def test_garbage_header(raw: bytes) -> None:
    rejects([raw])


def test_empty_message() -> None:
    rejects([], "empty")


def test_header_too_large() -> None:
    big = header("error", {"message": "x" * MAX_HEADER_BYTES})
    assert len(big) > MAX_HEADER_BYTES
    rejects([big], "exceeds")


def test_header_just_under_the_limit_is_fine() -> None:
    probe = header("error", {"message": ""})
    fits = header("error", {"message": "x" * (MAX_HEADER_BYTES - len(probe) - 8)})
    assert len(fits) <= MAX_HEADER_BYTES
    assert wire.decode([fits]).op == "error"


@pytest.mark.parametrize(
    "spec",
    [
        ["f128", [2]],  # unknown dtype
        ["F32", [2]],
        ["c64", [2]],
        [5, [2]],
        [["f32"], [2]],  # unhashable dtype
        [{"f32": 1}, [2]],
        ["f32", [0]],  # zero dim
        ["f32", [2, 0]],
        ["f32", [-2]],
        ["f32", []],  # no dims
        ["f32", [1] * (MAX_DIMS + 1)],  # too many dims
        ["f32", [2.0]],  # non-int dims
        ["f32", ["2"]],
        ["f32", [True]],
        ["f32", [None]],
        ["f32", [[2]]],
        ["f32", [2**31]],  # one dim too large for any payload
        ["f32", 2],  # shape not a list
        ["f32", "2"],
        ["f32"],  # wrong spec arity
        ["f32", [2], "extra"],
        "f32",
        {"f32": [2]},
        None,
    ],
)
def test_malformed_tensor_spec(spec: Any) -> None:
    rejects([header("sum", tensors=[spec]), b"\x00" * 8], "malformed tensor spec")


@pytest.mark.parametrize("specs", [{}, "f32", 1, None])
def test_tensor_list_not_a_list(specs: Any) -> None:
    raw = {"v": PROTOCOL_VERSION, "op": "sum", "tensors": specs, **VALID_FIELDS["sum"]}
    rejects([msgpack.packb(raw)], "tensors")


def test_missing_tensor_list() -> None:
    rejects([msgpack.packb({"v": PROTOCOL_VERSION, "op": "ping", "time": 1.0})], "tensors")


def test_frame_count_mismatch() -> None:
    frames = wire.encode("sum", VALID_FIELDS["sum"], [sample_tensor(torch.float32)])
    rejects(frames[:1], "1 tensors but 0 frames")
    rejects([*frames, b"\x00" * 60], "1 tensors but 2 frames")
    rejects([wire.encode("ping", VALID_FIELDS["ping"])[0], b"stray"], "0 tensors but 1 frames")


@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_payload_length_must_match_shape(dtype: torch.dtype, delta: int) -> None:
    head, payload = wire.encode("sum", VALID_FIELDS["sum"], [sample_tensor(dtype, (4, 4))])
    data = bytes(payload)
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    rejects([head, data], "needs")


def test_truncated_tensor_frame() -> None:
    head, payload = wire.encode("step", VALID_FIELDS["step"], [sample_tensor(torch.float32)])
    rejects([head, bytes(payload)[: len(payload) // 2]], "needs")
    rejects([head, b""], "needs")


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("f32", [2**30, 2**30]), ("f32", [2**31 - 1] * 4), ("bf16", [65536, 65536]),
     ("i8", [2**28 + 1]), ("f32", [2**26 + 1])],
)
def test_too_large_tensor_is_rejected_before_allocating(
    monkeypatch: pytest.MonkeyPatch, dtype: str, shape: list[int]
) -> None:
    def no_tensor_from_payload(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode built a tensor for an oversized declaration")

    monkeypatch.setattr(torch, "frombuffer", no_tensor_from_payload)
    frames = [header("sum", tensors=[[dtype, shape]]), b"\x00" * 16]
    tracemalloc.start()
    try:
        rejects(frames, "exceeds")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decode allocated {peak} bytes rejecting a declared {shape}"


@pytest.mark.parametrize("op", NO_TENSOR_OPS)
def test_tensors_on_ops_that_take_none(op: str) -> None:
    frames = [header(op, tensors=[["f32", [2]]]), b"\x00" * 8]
    rejects(frames, "expected 0..0 tensors")
    # encode does not validate; decode is the gate
    rejects(wire.encode(op, VALID_FIELDS[op], [torch.zeros(2)]), "expected 0..0 tensors")


@pytest.mark.parametrize("op", sorted(TENSOR_OPS))
def test_tensor_ops_take_only_their_number_of_tensors(op: str) -> None:
    low, high = TENSOR_OPS[op]
    if low > 0:
        rejects(wire.encode(op, VALID_FIELDS[op], valid_tensors(op, low - 1)), "tensors")
    too_many = [*valid_tensors(op, high), sample_tensor(torch.float32, (2,))]
    rejects(wire.encode(op, VALID_FIELDS[op], too_many), "tensors")
    for n in range(low, high + 1):
        message = wire.decode(wire.encode(op, VALID_FIELDS[op], valid_tensors(op, n)))
        assert len(message.tensors) == n


def test_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


# -- property: nothing but WireError ------------------------------------------------------------

_msgpack_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                   | st.floats(allow_nan=True) | st.text(max_size=12) | st.binary(max_size=12))
_msgpack_values = st.recursive(
    _msgpack_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Headers that look nearly right, so the checks past the msgpack layer are exercised too.
_ops = st.sampled_from(sorted(SCHEMAS)) | _msgpack_values
_specs = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([*WIRE_DTYPES, "f128"]) | _msgpack_values,
                  st.lists(st.integers(-2, 2**32) | _msgpack_leaves, max_size=5))
        .map(list),
        _msgpack_values,
    ),
    max_size=3,
)


@st.composite
def _near_valid_headers(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(_ops)
    body: dict[str, Any] = {"v": draw(st.just(PROTOCOL_VERSION) | _msgpack_leaves), "op": op}
    if draw(st.booleans()):
        body["tensors"] = draw(_specs)
    if isinstance(op, str) and op in VALID_FIELDS and draw(st.booleans()):
        body.update(VALID_FIELDS[op])
    body.update(draw(st.dictionaries(
        st.sampled_from(["seq", "step", "index", "start", "time", "rank", "x"]),
        _msgpack_values, max_size=3)))
    return body


_extra_frames = st.lists(st.binary(max_size=64), max_size=3)


def _decode_only_wire_errors(frames: list[bytes]) -> None:
    try:
        message = wire.decode(frames)
    except WireError:
        return
    assert message.op in SCHEMAS  # anything accepted is a well-formed message
    assert set(message.fields) == set(SCHEMAS[message.op])


_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(st.binary(max_size=256), _extra_frames)
def test_arbitrary_bytes_raise_only_wire_error(head: bytes, extra: list[bytes]) -> None:
    _decode_only_wire_errors([head, *extra])


@_FAST
@given(_msgpack_values, _extra_frames)
def test_arbitrary_msgpack_raises_only_wire_error(value: Any, extra: list[bytes]) -> None:
    _decode_only_wire_errors([msgpack.packb(value, use_bin_type=True), *extra])


@_FAST
@given(_near_valid_headers(), _extra_frames)
def test_near_valid_headers_raise_only_wire_error(body: dict[str, Any],
                                                  extra: list[bytes]) -> None:
    _decode_only_wire_errors([msgpack.packb(body, use_bin_type=True), *extra])


@_FAST
@given(st.sampled_from(sorted(TENSOR_OPS)), st.sampled_from(DTYPES),
       st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(0, 64),
       st.binary(max_size=8))
def test_mangled_tensor_frames_raise_only_wire_error(
    op: str, dtype: torch.dtype, shape: list[int], cut: int, junk: bytes
) -> None:
    head, payload = wire.encode(op, VALID_FIELDS[op], [sample_tensor(dtype, tuple(shape))])
    data = bytes(payload)
    _decode_only_wire_errors([head, data[:cut] + junk])
    _decode_only_wire_errors([head[: max(1, len(head) - cut)], data])
    _decode_only_wire_errors(as_bytes([head]) + [data] * 2)
