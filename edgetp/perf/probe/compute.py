"""What compute costs on this device: memory bandwidth, matrix-vector and matmul rates, and the
software overhead of a decoder layer and of a step.

Every product runs the code a decode step runs (:mod:`edgetp.kernels.native`; int8/int4 as
:mod:`edgetp.parallel.qlinear`), over more weight copies than any cache holds, and each figure
is the best of a few rounds, so a burst of other load on the machine is left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetp.config.model import ModelConfig
from edgetp.perf.probe.disk import split_rank_dir

GENERIC_SHAPES = [(4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (2048, 8192)]

Product = Callable[[], Any]


def tiny_config() -> ModelConfig:
    """A four-layer model small enough that bytes do not matter (overheads, runtime RSS)."""
    from edgetp.config.model import parse_hf_config

    return parse_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256})


def matvec_shapes(shard_dir: str | Path | None) -> list[tuple[int, int]]:
    """(in, out) of the linears of a shard's first layer, else a generic mix of sizes."""
    directory = split_rank_dir(shard_dir)
    if directory is None:
        return list(GENERIC_SHAPES)
    from edgetp.shard.manifest import read_manifest

    manifest = read_manifest(directory)
    layer = min(n for n in manifest.files if n.startswith("layer-"))
    per_byte = 2 if manifest.dtype == "int4" else 1  # int4: two codes per stored byte
    return [(e.shape[1] * per_byte, e.shape[0])
            for name, e in manifest.files[layer].tensors.items()
            if name.endswith("proj.weight")]


def measure_memory_bandwidth(nbytes: int) -> float:
    """GB/s of one streaming read of ``nbytes`` (best of five) on this thread: the native
    streaming reader (:func:`edgetp.kernels.native.stream_read`), else torch's float32 sum."""
    from edgetp.kernels import native
    from edgetp.perf.streams import read_buffer

    data = read_buffer(nbytes)  # [N] float32
    read = (lambda: native.stream_read(data)) if native.available() else data.sum
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def measure_matvec(dtype: str, shapes: list[tuple[int, int]], total_bytes: int,
                   seconds: float, rounds: int = 8) -> float:
    """Weight bytes per second of ``x [1, in] @ W.T`` over copies too many for any cache
    (the best of ``rounds`` rounds), with the scales of int8/int4 counted as weight bytes, as
    a split stores them."""
    import torch

    per_round = sum(matvec_weight_bytes(dtype, shape) for shape in shapes)
    copies = max(1, math.ceil(total_bytes / per_round))
    products = [_matvec_product(dtype, shape) for _ in range(copies) for shape in shapes]
    for product in products:  # warm up (and fault every page in)
        product()
    best = 0.0
    with torch.inference_mode():
        for _ in range(rounds):
            nbytes, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / rounds or nbytes == 0:
                for product in products:
                    product()
                nbytes += per_round * copies
            best = max(best, nbytes / elapsed / 1e9)
    return best


def matvec_weight_bytes(dtype: str, shape: tuple[int, int]) -> int:
    """The bytes a split stores for weights of ``shape`` (in, out) in ``dtype``."""
    n_in, n_out = shape
    if dtype == "int8" and n_in % 32 == 0:
        return n_out * n_in + 4 * n_out * n_in // 32  # I8 codes, F16 (scale, low) per 32
    if dtype == "int8":
        return n_out * n_in + 2 * n_out  # I8 codes, a BF16 scale per row (not whole blocks)
    if dtype == "int4":
        from edgetp.shard.quant import int4_group

        group = int4_group([n_in], 32)
        return n_out * n_in // 2 + 4 * (n_in // group) * n_out  # U8 codes, BF16 pairs
    import torch

    return n_out * n_in * int(getattr(torch, dtype).itemsize)


def _matvec_product(dtype: str, shape: tuple[int, int]) -> Product:
    """A ``[1, in] @ W.T`` product for weights of ``shape`` (in, out) in ``dtype``."""
    import torch

    from edgetp.core.pages import pack
    from edgetp.kernels import native as kernels

    n_in, n_out = shape
    x = torch.full((1, n_in), 0.5)  # [1, in] float32, as a quantized run's activations
    step = torch.empty(1, n_out)  # [1, out]: the buffer a decode linear writes into
    if dtype == "int8":
        from edgetp.parallel.qlinear import int8_product

        q = pack([torch.ones((n_out, n_in), dtype=torch.int8)])[0]  # [out, in], as loaded
        scale = (torch.full((2, n_out, n_in // 32), 0.01, dtype=torch.float16)
                 if n_in % 32 == 0 else torch.full((n_out,), 0.01, dtype=torch.bfloat16))
        return lambda: int8_product(x, q, scale, out=step)  # the split's format for n_in
    if dtype == "int4":
        return _int4_product(x, n_out, step)
    w = pack([torch.full((n_out, n_in), 0.01, dtype=getattr(torch, dtype))])[0]  # [out, in]
    xd, step = x.to(w.dtype), step.to(w.dtype)
    return lambda: kernels.linear(xd, w, step)  # the C decode kernels, or torch


def _int4_product(x: Any, n_out: int, step: Any) -> Product:
    """An int4 product for ``x`` [1, in], packed as the runtime packs resident weights."""
    import torch

    from edgetp.kernels import native as kernels
    from edgetp.parallel.qlinear import int4_product
    from edgetp.shard.quant import (
        int4_group,
        int4_tiled,
        native_int4_pack,
        native_int4_tiled,
        pack_int4,
    )

    n_in = x.shape[1]
    group = int4_group([n_in], 32)
    tiled = int4_tiled(n_out, group)  # else the runtime's fallback, as for such a split
    packed = pack_int4(torch.full((n_out, n_in), 9, dtype=torch.uint8), tiled)
    native = tiled and native_int4_tiled()
    repacked = tiled and not native and not kernels.has_int4()
    if repacked:  # resident weights are repacked once for this CPU
        packed = native_int4_pack(packed)
    scale_zero = torch.full((n_in // group, n_out, 2), 0.01, dtype=torch.bfloat16)
    return lambda: int4_product(x, packed, scale_zero, group, native or repacked, repacked,
                                out=step)


def measure_matmul(dtype: str, shapes: list[tuple[int, int]], seconds: float,
                   tokens: int = 128) -> float:
    """GFLOP/s a prefill-like ``[tokens, in] @ W.T`` adds over the ``[1, in]`` product with
    the same weights: the planner costs a T-token product as ``bytes / matvec bandwidth +
    2 (T - 1) params / this rate``, which fits CPU timings from T = 1 to 128."""
    import torch
    import torch.nn.functional as F

    torch_dtype = getattr(torch, dtype)
    weights = [torch.full((min(o, 4096), min(i, 4096)), 0.01, dtype=torch_dtype)
               for i, o in shapes[:2]]

    def best_time(rows: int) -> float:
        inputs = [torch.full((rows, w.shape[1]), 0.5, dtype=torch_dtype) for w in weights]
        for x, w in zip(inputs, weights, strict=True):
            F.linear(x, w)
        best, deadline = math.inf, time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline or best == math.inf:
            started = time.perf_counter()
            for x, w in zip(inputs, weights, strict=True):
                F.linear(x, w)
            best = min(best, time.perf_counter() - started)
        return best

    extra = best_time(tokens) - best_time(1)
    flops = 2 * (tokens - 1) * sum(w.numel() for w in weights)
    return flops / max(extra, 1e-9) / 1e9


def measure_overheads(iterations: int) -> tuple[float, float]:
    """(per-layer, per-step) microseconds of a tiny model where bytes do not matter."""
    import torch

    from edgetp.core.metrics import instrument
    from edgetp.model.llama import Transformer
    from edgetp.parallel.linears import on_kernels

    model = on_kernels(Transformer(tiny_config()).eval())  # a node's path: the C kernels and,
    # in float32, a layer's step programs (edgetp.model.layer_step)
    instrument(model)  # the loader's per-layer timing hooks are part of the overhead
    model.allocate_cache()
    token = torch.tensor([3])

    def step_s(layers: range, position: int) -> float:
        started = time.perf_counter()
        model.head(model.forward_layers(model.embed(token), position, layers))
        return time.perf_counter() - started

    ones, fours = [], []
    with torch.inference_mode():
        for i in range(iterations + 20):  # interleaved, so drifts hit both alike
            one, four = step_s(range(1), 16 + i % 64), step_s(range(4), 16 + i % 64)
            if i >= 20:
                ones.append(one)
                fours.append(four)
    one, four = _quartile(ones) * 1e6, _quartile(fours) * 1e6  # robust to other load
    layer = max(0.0, (four - one) / 3)
    return layer, max(0.0, one - layer)


def _quartile(values: list[float]) -> float:
    return sorted(values)[len(values) // 4]
