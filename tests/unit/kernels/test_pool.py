"""The decode products' thread pool (edgetp/kernels/csrc/pool.c): the same bits on any number of
threads, every product split, a busy pool and a forked child handled, the thread setting kept.
And the streaming reader (csrc/stream.c) reads every byte."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from edgetp.kernels import native as kernels
from edgetp.shard.quant import quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="no C compiler: the torch path is all there is")

# rows with tails of every row block (48, 64, 12, 8, 4); big enough to be split 3 ways
# the last two: x over 16 KiB in float32, then in bfloat16 too (rows several to a pass)
SHAPES = [(517, 1024), (1003, 384), (4099, 256), (203, 5024), (133, 8320)]
THREADS = (2, 3, 5)


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    yield
    kernels.set_threads(1)  # as the test session runs torch: one thread


def product(dtype: str, rows: int, cols: int) -> Callable[[], torch.Tensor | None]:
    """A fresh call of the product of ``dtype`` on seeded random inputs."""
    gen = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(1, cols, generator=gen)
    if dtype == "float32":
        return lambda: kernels.linear(x, w)
    if dtype == "bfloat16":
        w16, x16 = w.bfloat16(), x.bfloat16()
        return lambda: kernels.linear(x16, w16)
    if dtype == "int8":
        q, scale = quantize_int8(w)
        return lambda: kernels.int8_linear(x, q, scale)
    if dtype == "int8_b32":
        q, _ = quantize_int8(w)
        blocks = (torch.rand(rows, cols // 32, generator=gen) / 50).half()
        return lambda: kernels.int8_linear(x, q, blocks)
    packed, scale_zero = quantize_int4(w, 32)
    return lambda: kernels.int4_linear(x, packed, scale_zero.float() if dtype == "int4_f32"
                                       else scale_zero, 32)


PRODUCTS = ["float32", "bfloat16", "int8", "int8_b32", "int4", "int4_f32"]


def needs_int4(dtype: str) -> None:
    if dtype.startswith("int4") and not kernels.has_int4():
        pytest.skip("no native int4 product on this CPU (AVX-512 VNNI)")


@pytest.mark.parametrize("dtype", PRODUCTS)
@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_every_thread_count_gives_the_same_bits(dtype: str, rows: int, cols: int) -> None:
    needs_int4(dtype)
    if dtype.startswith("int4") and rows % 16:
        rows -= rows % 16  # the int4 layout's rows come in sixteens
    call = product(dtype, rows, cols)
    kernels.set_threads(1)
    alone = call()
    assert alone is not None
    for n in THREADS:
        assert kernels.set_threads(n) == n
        splits = kernels.pool_jobs()
        got = call()
        assert got is not None and kernels.pool_jobs() == splits + 1  # it was split
        assert torch.equal(got.view(torch.int16 if got.dtype == torch.bfloat16 else torch.int32),
                           alone.view(torch.int16 if alone.dtype == torch.bfloat16
                                      else torch.int32)), f"{n} threads"


def test_small_products_stay_on_the_calling_thread() -> None:
    kernels.set_threads(4)
    call = product("float32", 16, 64)  # 4 KiB of weight: waking threads would cost more
    splits = kernels.pool_jobs()
    call()
    assert kernels.pool_jobs() == splits


def test_threads_setting() -> None:
    assert kernels.set_threads(3) == kernels.threads() == 3
    assert kernels.set_threads(None) == kernels.threads() == kernels.usable_cores()
    with pytest.raises(ValueError, match="threads must be >= 1"):
        kernels.set_threads(0)


def test_concurrent_callers_share_the_pool() -> None:
    """Ranks as threads of one process call products at once: one gets the pool, the others
    compute alone, all right."""
    kernels.set_threads(2)
    calls = [product(dtype, 1003, 384) for dtype in ("float32", "int8", "bfloat16")]
    want = [call().clone() for call in calls]  # type: ignore[union-attr]
    errors: list[str] = []

    def hammer(k: int) -> None:
        for _ in range(50):
            got = calls[k]()
            if got is None or not torch.equal(got, want[k]):
                errors.append(f"caller {k}")
                return

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_computes_without_the_parents_threads() -> None:
    kernels.set_threads(3)
    call = product("float32", 1003, 384)
    want = call().clone()  # type: ignore[union-attr]
    pid = os.fork()
    if pid == 0:  # the child: the pool's threads did not come along; products must not wait
        try:
            ok = kernels.threads() == 1 and torch.equal(call(), want)  # type: ignore[arg-type]
            ok = ok and kernels.set_threads(2) == 2 and torch.equal(call(), want)  # type: ignore[arg-type]
        finally:
            os._exit(0 if ok else 1)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        threading.Event().wait(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in a product")


def test_stream_reader_reads_every_byte() -> None:
    """Whole strides of its accumulators are summed as 32-bit words, the rest bytewise."""
    words = torch.randint(0, 2**20, (100_003,), dtype=torch.int32)  # a ragged length
    stride = 8 * kernels.library().et_stream_vector_bytes()  # type: ignore[union-attr]
    whole = words.numel() * 4 // stride * stride // 4
    want = int(words[:whole].long().sum()) + int(words[whole:].view(torch.uint8).long().sum())
    assert kernels.stream_read(words) == want % 2**32
    assert kernels.stream_path() in ("avx512", "avx2", "neon", "generic")
    with pytest.raises(ValueError, match="contiguous"):
        kernels.stream_read(torch.zeros(8, 8)[:, 0])
