"""Quantized weights (``edgetp.shard.quant``, ``edgetp.parallel.qlinear``) and int8 activations
on the wire.

* int8 and int4 round trips stay within the format's error bound (half a scale, per channel or
  per group), for the tiled and the rows int4 layouts, and the layouts round-trip;
* the packed kernels agree with the dequantize-and-matmul fallback (to bfloat16 precision);
* the splitter writes codes next to their scales, records int8/int4 and the group in the
  manifest, shrinks int4 groups to fit the row-parallel slices or refuses clearly; int8 row
  scales do not depend on the node count;
* an int8 split gives identical tokens on 1 and 3 ranks (threads), and the demo model's known
  answer holds in int8 (and in int4);
* window mode with quantized shards gives bit-identical logits to resident quantized shards,
  also on a CPU whose int4 kernel wants another layout (simulated).

The int8 activations on the wire: tests/unit/net/test_codec.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.hf_models import VOCAB
from helpers.parallel import RankContext, run_sharded
from safetensors import safe_open

from edgetp.config.model import load_model_config
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.model.llama import Transformer
from edgetp.model.tokenizer import Tokenizer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel import qlinear
from edgetp.parallel.loader import load_rank, shard_memory_needs
from edgetp.parallel.qlinear import (
    QuantLinear,
    QuantRowParallelLinear,
    int4_matmul,
    int8_matmul,
    int8_product,
)
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import read_manifest
from edgetp.shard.plan import make_plan
from edgetp.shard.quant import (
    SCALE_SUFFIX,
    QuantError,
    dequantize_int4,
    dequantize_int8,
    int4_group,
    int4_tiled,
    native_int4_tiled,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 64


def weights(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes and offsets (scales must follow each row/group)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(out_features, in_features, generator=gen)
    magnitude = torch.logspace(-3, 1, out_features)[:, None]
    offset = torch.randn(out_features, 1, generator=gen)
    return rows * magnitude + offset * magnitude


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 96), (7, 13), (1, 1), (200, 48)])
def test_int8_round_trip_within_half_a_scale_per_channel(shape: tuple[int, int]) -> None:
    w = weights(*shape)
    w[0] = 0.0  # an all-zero channel
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == shape[:1]
    assert q.abs().max() <= 127
    error = (w - dequantize_int8(q, scale)).abs()
    assert (error <= scale.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert (scale.float() >= w.abs().amax(1) / 127).all()  # rounded up: never clips


def test_int8_shared_row_amax_quantizes_a_slice_like_the_whole_row() -> None:
    w = weights(32, 96)
    whole_q, whole_scale = quantize_int8(w)
    part_q, part_scale = quantize_int8(w[:, 40:72], w.abs().amax(1))
    assert torch.equal(part_scale, whole_scale) and torch.equal(part_q, whole_q[:, 40:72])


@pytest.mark.parametrize(("shape", "group"), [((64, 96), 32), ((80, 64), 32), ((48, 128), 64),
                                              ((12, 48), 16), ((100, 256), 128), ((16, 8), 8)])
def test_int4_round_trip_within_half_a_scale_per_group(shape: tuple[int, int],
                                                       group: int) -> None:
    w = weights(*shape)
    w[-1] = 5.0  # a constant row far from zero: zero point and scale must still cover it
    packed, scale_zero = quantize_int4(w, group)
    out_features, in_features = shape
    assert packed.dtype == torch.uint8 and packed.shape == (out_features, in_features // 2)
    assert scale_zero.dtype == torch.bfloat16
    assert scale_zero.shape == (in_features // group, out_features, 2)
    deq = dequantize_int4(packed, scale_zero)
    scale = scale_zero[..., 0].float().transpose(0, 1).repeat_interleave(group, dim=1)
    assert ((w - deq).abs() <= scale / 2 * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 128, 176])
@pytest.mark.parametrize("tiled", [True, False])
def test_int4_layouts_round_trip(rows: int, tiled: bool) -> None:
    codes = torch.randint(0, 16, (rows, 64), dtype=torch.uint8)
    packed = pack_int4(codes, tiled)
    assert packed.shape == (rows, 32)
    assert torch.equal(unpack_int4(packed, tiled), codes)


def test_tiled_layout_is_the_cpu_kernels_where_it_exists() -> None:
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if not native_int4_tiled():
        pytest.skip("this CPU's int4 kernel wants another layout (repacked at load)")
    for rows in (64, 80, 112, 192):
        codes = torch.randint(0, 16, (rows, 96), dtype=torch.int32)
        assert torch.equal(convert(codes, 8), pack_int4(codes, True))


def test_int4_group_shrinks_to_divide_every_slice_or_refuses() -> None:
    assert int4_group([96], 32) == 32
    assert int4_group([48, 48, 96], 32) == 16
    assert int4_group([256, 384], 128) == 128
    with pytest.raises(QuantError, match="int8"):
        int4_group([12, 24], 32, "self_attn.o_proj.weight")
    assert int4_tiled(64, 32) and not int4_tiled(64, 16) and not int4_tiled(40, 32)


# -- kernels against the fallback ---------------------------------------------------------------


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-2) -> bool:
    """Equal to bfloat16 precision (the kernels take bfloat16 activations)."""
    return float((got - want).abs().max()) <= rtol * float(want.abs().max())


@pytest.mark.parametrize("width", [160, 36])  # 36: not a width the kernel takes
@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_fallback(rows: int, dtype: torch.dtype, width: int) -> None:
    w = weights(96, width) / 10
    q, scale = quantize_int8(w)
    x = torch.randn(rows, width).to(dtype)
    exact = x.float() @ dequantize_int8(q, scale).T
    kernel = int8_matmul(x, q, scale, kernel=True)
    fallback = int8_matmul(x, q, scale, kernel=False)
    assert kernel.dtype == dtype and fallback.dtype == dtype and kernel.shape == (rows, 96)
    assert close(kernel.float(), exact) and close(fallback.float(), exact)
    if dtype == torch.float32:  # the fallback in float32 is exact up to summation order
        assert torch.allclose(fallback, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 100])
@pytest.mark.parametrize(("out_features", "group"), [(128, 32), (80, 64), (48, 16)])
def test_int4_kernel_equals_fallback(rows: int, out_features: int, group: int) -> None:
    w = weights(out_features, 128) / 10
    packed, scale_zero = quantize_int4(w, group)
    x = torch.randn(rows, 128)
    exact = x @ dequantize_int4(packed, scale_zero).T
    fallback = int4_matmul(x, packed, scale_zero, group, kernel_layout=False)
    assert close(fallback, exact)
    if int4_tiled(out_features, group) and native_int4_tiled():
        assert close(int4_matmul(x, packed, scale_zero, group, kernel_layout=True), exact)


@pytest.mark.parametrize(("out_features", "group"), [(200, 32), (136, 16), (150, 32)])
def test_the_fallback_widens_a_few_rows_at_a_time_and_gives_the_whole_product(
        out_features: int, group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 rows at a time (the tiled layout's blocks; 200 and 136 rows end in a partial block,
    150 rows are in the rows layout): each chunk equals the whole matrix's product, in int4 and
    int8 (row and block scales), while no widened copy is larger than the chunk."""
    monkeypatch.setattr(qlinear, "WIDEN_CHUNK_ELEMENTS", 64 * 128)
    monkeypatch.setenv("EDGETP_QUANT_KERNELS", "0")  # float32 throughout: exact comparisons
    widened: list[int] = []
    real_linear = qlinear.F.linear

    def recording_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        widened.append(w.shape[0])
        return real_linear(x, w)

    monkeypatch.setattr(qlinear.F, "linear", recording_linear)
    w, x = weights(out_features, 128) / 10, torch.randn(5, 128)
    packed, scale_zero = quantize_int4(w, group)
    got = int4_matmul(x, packed, scale_zero, group, kernel_layout=False)
    assert torch.allclose(got, x @ dequantize_int4(packed, scale_zero).T, rtol=1e-5, atol=1e-5)
    q, scale = quantize_int8(w)
    for scales in (scale, scale[:, None].expand(-1, 4).contiguous()):  # per row, per 32
        got = int8_matmul(x, q, scales, kernel=False)
        assert torch.allclose(got, x @ dequantize_int8(q, scales).T, rtol=1e-5, atol=1e-5)
    assert max(widened) == 64 and len(widened) == 3 * -(-out_features // 64)


def test_quant_linear_adds_the_bias_after_the_allreduce() -> None:
    class Doubling:
        rank, world_size = 0, 2

        def allreduce(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    w = weights(32, 64) / 10
    q, scale = quantize_int8(w)
    layer = QuantRowParallelLinear("int8", (32, 64), (32,), True, Doubling())
    for name, value in (("weight", q), ("weight_scale", scale), ("bias", torch.randn(32))):
        setattr(layer, name, torch.nn.Parameter(value, requires_grad=False))
    x = torch.randn(2, 64)
    want = 2 * int8_product(x, q, scale) + layer.bias
    assert torch.equal(layer(x), want)


# -- the splitter -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir):
    """Factory ``(model, ranks, dtype, group=32) -> rank directories``, cached per module.

    ``model`` is "demo" or a tiny random family (6 layers, so windows have blocks to stream).
    """
    cache: dict[tuple, list[Path]] = {}

    def make(model: str, ranks: int, dtype: str, group: int = 32) -> list[Path]:
        key = (model, ranks, dtype, group)
        if key not in cache:
            source = DEMO_MODEL_DIR if model == "demo" else tiny_model_dir(
                model, num_hidden_layers=6)[0]
            out = tmp_path_factory.mktemp(f"q_{model}_{ranks}_{dtype}_{group}")
            cache[key] = split_checkpoint(source, out, ranks, dtype=dtype,
                                          group_size=group).rank_dirs
        return cache[key]

    return make


def test_split_stores_codes_next_to_scales_and_floats_elsewhere(splits) -> None:
    dirs = splits("mlp_bias", 2, "int8")
    manifest = read_manifest(dirs[1])
    assert manifest.dtype == "int8" and manifest.group_size == 0
    entries = manifest.files[layer_file(0)].tensors
    assert entries["mlp.down_proj.weight"].dtype == "I8"
    assert entries["mlp.down_proj.weight_scale"].dtype == "BF16"
    assert entries["mlp.down_proj.bias"].dtype == "F32"  # biases and norms stay float
    assert entries["input_layernorm.weight"].dtype == "F32"
    head = read_manifest(dirs[0]).files
    assert head["head.safetensors"].tensors["lm_head.weight"].dtype == "I8"
    assert head["embed.safetensors"].tensors["embed_tokens.weight"].dtype == "F32"
    int4 = read_manifest(splits("mlp_bias", 2, "int4", 64)[0])
    assert int4.dtype == "int4" and int4.group_size == 64
    assert int4.files[layer_file(0)].tensors["mlp.up_proj.weight"].dtype == "U8"


def stored(rank_dir: Path, name: str) -> torch.Tensor:
    with safe_open(rank_dir / layer_file(1), "pt") as layer:
        return layer.get_tensor(name)


@pytest.mark.parametrize("name", ["self_attn.o_proj.weight", "mlp.down_proj.weight"])
def test_int8_blocks_do_not_depend_on_the_node_count(splits, name: str) -> None:
    """A row-parallel weight whose slices are whole 32-column blocks at 1 and 3 nodes: the 3
    ranks' codes and (scale, low) pairs are the whole weight's, cut between blocks."""
    one, three = splits("head_dim", 1, "int8"), splits("head_dim", 3, "int8")
    scale = stored(one[0], name + SCALE_SUFFIX)
    assert scale.shape[0] == 2 and scale.dtype == torch.float16  # blocks
    assert torch.equal(torch.cat([stored(d, name) for d in three], dim=1), stored(one[0], name))
    assert torch.equal(torch.cat([stored(d, name + SCALE_SUFFIX) for d in three], dim=2), scale)


def test_int8_row_scales_do_not_depend_on_the_node_count(splits) -> None:
    """The demo's heads are 12 columns wide: slices that are not whole blocks keep one scale a
    row, taken over the whole row, so 2 and 3 nodes store the same scales."""
    two, three = splits("demo", 2, "int8"), splits("demo", 3, "int8")
    name = "self_attn.o_proj.weight_scale"
    scale = stored(two[0], name)
    assert scale.dim() == 1 and scale.dtype == torch.bfloat16
    for d in [*two, *three]:
        assert torch.equal(stored(d, name), scale)


def test_int4_split_shrinks_the_o_proj_group_to_whole_heads(splits) -> None:
    # demo: head_dim 12, 8 heads; on 2 ranks o_proj slices are 48 columns: group 16
    manifest = read_manifest(splits("demo", 2, "int4")[0])
    tensors = manifest.files[layer_file(0)].tensors
    assert tensors["self_attn.o_proj.weight_scale"].shape == (48 // 16, 96, 2)
    assert tensors["self_attn.q_proj.weight_scale"].shape == (96 // 32, 48, 2)


def test_int4_split_refuses_slices_no_group_divides(tmp_path: Path) -> None:
    config = load_model_config(DEMO_MODEL_DIR)
    assert make_plan(config, 8).share(0).n_q_heads == 1  # o_proj slices of 12 columns
    with pytest.raises(QuantError, match="o_proj"):
        split_checkpoint(DEMO_MODEL_DIR, tmp_path, 8, dtype="int4")


def test_split_again_with_another_group_needs_force(splits, tmp_path: Path) -> None:
    split_checkpoint(DEMO_MODEL_DIR, tmp_path, 1, dtype="int4", group_size=32)
    assert split_checkpoint(DEMO_MODEL_DIR, tmp_path, 1, dtype="int4", group_size=32).skipped
    with pytest.raises(ValueError, match="--force"):
        split_checkpoint(DEMO_MODEL_DIR, tmp_path, 1, dtype="int4", group_size=64)


def test_quantized_split_is_a_quarter_of_float32_on_disk(splits) -> None:
    def layer_bytes(d: Path) -> int:
        return sum(f.size for n, f in read_manifest(d).files.items() if n.startswith("layer-"))

    f32 = layer_bytes(splits("demo", 1, "float32")[0])
    assert layer_bytes(splits("demo", 1, "int8")[0]) < 0.3 * f32  # + (scale, low) per 32
    assert layer_bytes(splits("demo", 1, "int4")[0]) < 0.2 * f32


# -- running quantized shards -------------------------------------------------------------------


def load_all(dirs: list[Path], budgets: list[int | None] | None = None) -> list[Transformer]:
    group = InProcessGroup(len(dirs))
    budgets = budgets or [None] * len(dirs)
    return [load_rank(d, group.communicator(r), max_seq_len=MAX_SEQ_LEN, memory_budget=b)
            for r, (d, b) in enumerate(zip(dirs, budgets, strict=True))]


def greedy(models: list[Transformer], prompt: list[int], steps: int,
           stop: set[int] = frozenset()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding over ranks as threads: (tokens, logits of every step)."""
    def work(model: Transformer, ctx: RankContext) -> tuple[list[int], list[torch.Tensor]]:
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        current, pos = torch.tensor(prompt), 0
        for _ in range(steps):
            h = ctx.broadcast(model.embed(current) if ctx.rank == 0 else None)
            h = model.forward_layers(h, pos, range(model.config.num_hidden_layers))
            done = None
            if ctx.rank == 0:
                logits.append(model.head(h[-1:])[0])
                tokens.append(int(logits[-1].argmax()))
                done = tokens[-1] in stop
            pos += current.numel()
            if ctx.broadcast(done):
                break
            current = torch.tensor([ctx.broadcast(tokens[-1] if ctx.rank == 0 else None)])
        return tokens, logits

    return run_sharded(models, len(models), work)


def demo_answer(models: list[Transformer], step: int, start: int) -> str:
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    prompt = tokenizer.encode(demo_prompt(step, start))
    tokens, _ = greedy(models, prompt, 40, set(tokenizer.eos_token_ids))
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids]).strip()


CASES = [(3, 5), (7, 2), (1, 80), (9, 9)]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_demo_known_answer_holds_quantized(splits, dtype: str) -> None:
    models = load_all(splits("demo", 2, dtype))
    assert isinstance(models[0].layers[0].mlp.down_proj, QuantRowParallelLinear)
    assert isinstance(models[0].lm_head, QuantLinear)
    # quantized linears keep the buffer rule of the float ones they replace
    assert models[0].layers[0].mlp.down_proj.reuse_output
    assert models[0].layers[0].self_attn.q_proj.reuse_output
    assert not models[0].lm_head.reuse_output  # greedy() below keeps every step's logits
    for step, start in CASES:
        assert demo_answer(models, step, start) == expected_text(step, start)


NEAR_TIE = 0.1  # logits: top two closer than this may swap between rank counts


def test_int8_one_and_three_ranks_give_identical_tokens(splits) -> None:
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    eos = set(tokenizer.eos_token_ids)  # after EOS the demo model is off its rule: stop there
    one, three = load_all(splits("demo", 1, "int8")), load_all(splits("demo", 3, "int8"))
    for step, start in CASES:
        prompt = tokenizer.encode(demo_prompt(step, start))
        assert greedy(one, prompt, 50, eos)[0] == greedy(three, prompt, 50, eos)[0]
    # a random model: the same tokens up to a near tie (a step whose top two logits are closer
    # than the ranks' bfloat16 prefill products can differ), and close logits until then
    random_prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    one, three = load_all(splits("llama3", 1, "int8")), load_all(splits("llama3", 3, "int8"))
    (tokens_one, logits_one), (tokens_three, logits_three) = (
        greedy(models, random_prompt.tolist(), 12) for models in (one, three))
    checked = 0
    for a, b, want, got in zip(tokens_one, tokens_three, logits_one, logits_three, strict=True):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0)
        first, second = want.topk(2).values.tolist()
        if first - second < NEAR_TIE:
            break
        assert a == b
        checked += 1
    assert checked >= 4


def budgets(dirs: list[Path], fraction: float) -> list[int]:
    """Budgets streaming about ``fraction`` of each rank's blocks (1.0: the minimum)."""
    out = []
    for d in dirs:
        needs = shard_memory_needs(d, max_seq_len=MAX_SEQ_LEN)
        out.append(int(needs.minimum() + (needs.total - 1 - needs.minimum()) * (1 - fraction)))
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_window_gives_the_same_logits_as_resident(splits, dtype: str, fraction: float) -> None:
    dirs = splits("llama3", 2, dtype)
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    want = greedy(load_all(dirs), prompt, 10)
    streamed = load_all(dirs, budgets(dirs, fraction))
    assert all(m.window is not None and m.window.streamed for m in streamed)
    got = greedy(streamed, prompt, 10)
    for m in streamed:
        m.window.close()
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.equal(a, b)


def test_tied_embeddings_quantize_the_head_and_keep_the_embedding(splits) -> None:
    dirs = splits("llama32", 2, "int8")  # tie_word_embeddings: the head is written quantized
    files = read_manifest(dirs[0]).files
    assert files["head.safetensors"].tensors["lm_head.weight"].dtype == "I8"
    assert files["embed.safetensors"].tensors["embed_tokens.weight"].dtype == "F32"
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(8)).tolist()
    want = greedy(load_all(splits("llama32", 2, "float32")), prompt, 4)
    resident = load_all(dirs)
    assert resident[0].lm_head.weight is not resident[0].embed_tokens.weight
    got = greedy(resident, prompt, 4)
    assert all(close(a, b, 5e-2) for a, b in zip(got[1], want[1], strict=True))
    streamed = load_all(dirs, budgets(dirs, 1.0))
    assert torch.equal(torch.stack(greedy(streamed, prompt, 4)[1]), torch.stack(got[1]))
    for m in streamed:
        m.window.close()


def test_int4_on_a_cpu_with_another_kernel_layout(splits, monkeypatch) -> None:
    """Resident layer weights are repacked by torch's converter, streamed ones use the
    fallback."""
    dirs = splits("llama3", 1, "int4")
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(6)).tolist()
    native = greedy(load_all(dirs), prompt, 6)
    monkeypatch.setattr("edgetp.parallel.qlinear.native_int4_tiled", lambda: False)
    monkeypatch.setattr("edgetp.kernels.native.has_int4", lambda: False)  # no AVX-512 VNNI there
    for models in (load_all(dirs), load_all(dirs, budgets(dirs, 1.0))):
        got = greedy(models, prompt, 6)
        layers = [m for m in models[0].modules()  # the head (float32 logits) never repacks
                  if isinstance(m, QuantLinear) and m.tiled and not m.float_output]
        streamed = models[0].window is not None
        assert layers and all(m.repacked != streamed for m in layers)
        for a, b in zip(got[1], native[1], strict=True):
            assert close(a, b, 5e-2)
        if streamed:
            models[0].window.close()
