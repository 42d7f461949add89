"""The real SmolLM2-135M-Instruct Q4_1 GGUF (llama.cpp's own file, from the ``smollm2_gguf``
fixture; skipped without it): converted, it holds the file's values, tokenizes and computes
as transformers' own GGUF loading does, and its int4 split keeps the file's blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgetp.model.checkpoint import Checkpoint, load_model
from edgetp.model.gguf import GGUFFile, convert_gguf
from edgetp.model.gguf.tensors import read_rows, row_order
from edgetp.model.tokenizer import Tokenizer
from edgetp.shard.layout import layer_file
from edgetp.shard.quant import SCALE_SUFFIX, dequantize_int4
from edgetp.shard.split import split_checkpoint

TEXTS = ["What is the capital of France?", "In 2024, 1,234 people paid $56.78 each.",
         "naïve café — 日本語 🙂\n\n\tdone", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def real(request, tmp_path_factory) -> tuple[Path, Path]:
    """(the GGUF file, its conversion)."""
    try:
        given = Path(request.getfixturevalue("smollm2_gguf"))
    except pytest.FixtureLookupError:
        pytest.skip("needs the smollm2_gguf fixture (the SmolLM2 wheel)")
    path = given if given.is_file() else next(given.rglob("*.gguf"))
    return path, convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "hf")


def file_value(path: Path, name: str, heads: int = 0) -> torch.Tensor:
    tensor = GGUFFile(path).tensors[name]
    return read_rows(tensor, row_order(int(tensor.shape[1]), heads)).float()


def test_weights_are_the_files_values(real):
    path, out = real
    checkpoint = Checkpoint(out)
    picked = [("embed_tokens", "token_embd", 0), ("layers.0.self_attn.q_proj", "blk.0.attn_q", 9),
              ("layers.29.self_attn.k_proj", "blk.29.attn_k", 3),
              ("layers.7.mlp.down_proj", "blk.7.ffn_down", 0)]
    for hf, gguf_name, heads in picked:  # (Q, K: rows reordered back over 9 / 3 heads)
        value = file_value(path, f"{gguf_name}.weight", heads)
        assert torch.equal(checkpoint.get(f"model.{hf}.weight"), value), hf


def test_tokenizer_and_logits_equal_transformers_own_gguf_load(real):
    import transformers

    path, out = real
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_dir(out)
    for text in TEXTS:
        assert ours.encode(text) == reference(text)["input_ids"], text
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.tensor(ours.encode(TEXTS[0]))
    with torch.no_grad():
        want = model(tokens[None]).logits[0]
        got = load_model(out, max_seq_len=64)(tokens, 0)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_int4_split_keeps_the_files_q4_1_blocks(real, tmp_path):
    path, out = real
    rank1 = split_checkpoint(out, tmp_path, 2, dtype="native").rank_dirs[1]
    with safe_open(rank1 / layer_file(5), "pt") as handle:
        codes = handle.get_tensor("mlp.up_proj.weight")
        scale_zero = handle.get_tensor("mlp.up_proj.weight" + SCALE_SUFFIX)
    assert scale_zero.dtype == torch.float32
    want = file_value(path, "blk.5.ffn_up.weight")[768:]  # rank 1's MLP columns
    assert (dequantize_int4(codes, scale_zero) - want).abs().max() <= 2**-18 * want.abs().max()
