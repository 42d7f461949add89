"""A GGUF's own Q4_0/Q4_1 and Q8_0 blocks split as they are (edgetp.shard.gguf_blocks): the split,
dequantized by edgetp's own formats, equals the file's dequantized values within float rounding,
and two ranks over such a split compute the single-device model of the dequantized weights."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from helpers.gguf_files import Q, gguf_weights, write_gguf
from helpers.parallel import RankContext, run_sharded
from safetensors import safe_open

from edgetp.config.model import load_model_config
from edgetp.model.checkpoint import load_model
from edgetp.model.gguf import convert_gguf
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.loader import load_rank
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import read_manifest
from edgetp.shard.plan import layer_slices, make_plan
from edgetp.shard.quant import SCALE_SUFFIX, dequantize_int4, dequantize_int8
from edgetp.shard.split import split_checkpoint

VOCAB = 320
ROUNDING = 2.0**-18  # float32 rounding of (q - 8) * d + (m + 8 d) against d * q + m


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Factory ``(qtype, intermediate) -> (gguf file, converted directory)``, cached."""
    from helpers.hf_models import make_hf_model

    cache = {}

    def make(qtype: Q, intermediate: int = 96):
        key = (qtype, intermediate)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"blocks_{qtype.name}_{intermediate}")
            hf_dir, _ = make_hf_model(root, "llama3", vocab_size=VOCAB, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=intermediate)
            path = write_gguf(hf_dir, root / "m.gguf", qtype)
            cache[key] = path, convert_gguf(path, root / "hf")
        return cache[key]

    return make


def split_values(rank_dir, name):
    """(codes, scales) of ``name`` in a split file, and the scales' dtype."""
    with safe_open(rank_dir / name[0], "pt") as handle:
        return handle.get_tensor(name[1]), handle.get_tensor(name[1] + SCALE_SUFFIX)


def expected_slices(model_dir, gguf_path, ranks):
    """Per rank, per (file, tensor): the GGUF's dequantized values of that rank's slice."""
    config = load_model_config(model_dir)
    plan = make_plan(config, ranks)
    whole = gguf_weights(gguf_path)
    out = []
    for rank in range(ranks):
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for name, part in layer_slices(plan, rank, config).items():
                if not name.endswith("proj.weight"):
                    continue
                value = whole[f"model.layers.{layer}.{name}"]
                if part.dim is not None:
                    value = value.narrow(part.dim, part.start, part.stop - part.start)
                tensors[(layer_file(layer), name)] = value
        if rank == 0:
            tensors[("head.safetensors", "lm_head.weight")] = whole["lm_head.weight"]
        out.append(tensors)
    return out


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_int4_split_keeps_the_files_q4_blocks(converted, tmp_path, qtype):
    """2 ranks: down_proj slices of 48 columns get groups of 16, half a block each. The head
    is asked for in int4 too (an int4 split's default head is int8), so it keeps its blocks."""
    gguf_path, model_dir = converted(qtype)
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype="int4", head_dtype="int4").rank_dirs
    for rank_dir, want in zip(dirs, expected_slices(model_dir, gguf_path, 2), strict=True):
        for key, value in want.items():
            codes, scale_zero = split_values(rank_dir, key)
            assert scale_zero.dtype == torch.float32, key  # the kept blocks, not bfloat16
            got = dequantize_int4(codes, scale_zero)
            assert (got - value).abs().max() <= ROUNDING * value.abs().max(), key
    down = read_manifest(dirs[1]).files[layer_file(0)].tensors["mlp.down_proj.weight_scale"]
    assert down.shape[0] == 48 // 16


def test_int8_split_keeps_the_files_q8_blocks_exactly(converted, tmp_path):
    gguf_path, model_dir = converted(Q.Q8_0, 128)
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype="int8").rank_dirs
    for rank_dir, want in zip(dirs, expected_slices(model_dir, gguf_path, 2), strict=True):
        for key, value in want.items():
            codes, scale = split_values(rank_dir, key)
            assert scale.dtype == torch.float16 and scale.shape == (codes.shape[0],
                                                                    codes.shape[1] // 32)
            assert torch.equal(dequantize_int8(codes, scale), value), key


def test_native_dtype_follows_the_files_quantization(converted, tmp_path):
    cases = [(Q.Q4_1, "int4", 32), (Q.Q8_0, "int8", 0), (Q.F16, "float16", 0)]
    for qtype, dtype, group in cases:
        _, model_dir = converted(qtype)
        split = split_checkpoint(model_dir, tmp_path / qtype.name, 2, dtype="native",
                                 group_size=64)
        manifest = read_manifest(split.rank_dirs[0])
        assert (manifest.dtype, manifest.group_size) == (dtype, group)


def test_a_replaced_gguf_is_quantized_anew_never_mixed_in(converted, tmp_path, caplog):
    gguf_path, model_dir = converted(Q.Q4_1)
    copy = shutil.copytree(model_dir, tmp_path / "hf")
    other_gguf, _ = converted(Q.Q4_0)  # same names and shapes, other values
    record = (copy / "gguf_source.json").read_text().replace(str(gguf_path), str(other_gguf))
    (copy / "gguf_source.json").write_text(record)
    with caplog.at_level(logging.WARNING):
        dirs = split_checkpoint(copy, tmp_path / "split", 1, dtype="int4").rank_dirs
    assert "no longer holds the weights" in caplog.text
    _, scale_zero = split_values(dirs[0], (layer_file(0), "mlp.up_proj.weight"))
    assert scale_zero.dtype == torch.bfloat16  # quantized from the converted weights


@torch.no_grad()
@pytest.mark.parametrize("exact", [True, False], ids=["reference", "kernels"])
def test_two_ranks_compute_the_dequantized_model(converted, tmp_path, monkeypatch, exact):
    """int4 from Q4_1 blocks on 2 ranks against one device on the converted float weights;
    ``reference``: EDGETP_QUANT_KERNELS=0, dequantize then float32 matmuls."""
    if exact:
        monkeypatch.setenv("EDGETP_QUANT_KERNELS", "0")
    _, model_dir = converted(Q.Q4_1)
    # the head as the layers (kept Q4_1 blocks): the default int8 head would be re-quantized
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype="native", head_dtype="same").rank_dirs
    group = InProcessGroup(2)
    ranks = [load_rank(d, group.communicator(r), max_seq_len=64) for r, d in enumerate(dirs)]
    tokens = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3))

    def work(model, ctx: RankContext):
        h = ctx.broadcast(model.embed(tokens) if ctx.rank == 0 else None)
        h = model.forward_layers(h, 0, range(model.config.num_hidden_layers))
        prefill = model.head(h) if ctx.rank == 0 else None
        step = ctx.broadcast(model.embed(tokens[-1:]) if ctx.rank == 0 else None)
        step = model.forward_layers(step, len(tokens), range(model.config.num_hidden_layers))
        return prefill, model.head(step) if ctx.rank == 0 else None

    prefill, decode = run_sharded(ranks, 2, work)
    single = load_model(model_dir, max_seq_len=64)
    want = single(torch.cat((tokens, tokens[-1:])), 0)
    scale = want.abs().max()
    tolerance = 1e-5 if exact else 0.03  # kernels: bfloat16 prefill, int16 x in decode
    assert (prefill - want[:-1]).abs().max() <= tolerance * scale
    assert (decode - want[-1:]).abs().max() <= tolerance * scale
