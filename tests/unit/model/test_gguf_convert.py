"""edgetp.model.gguf: GGUF files written as llama.cpp writes them, converted, checked against the
file's own values, the original model, and transformers' own GGUF loading (the oracle)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.gguf_files import K_QUANTS, Q, gguf_weights, write_gguf
from helpers.hf_models import read_tensors

from edgetp.model.checkpoint import load_model
from edgetp.model.gguf import GGUFError, convert_gguf
from edgetp.model.gguf.hfconfig import llama3_factors
from edgetp.model.gguf.reader import GGUFFile

VOCAB = 320  # the byte-level and SentencePiece test vocabularies need 256 byte symbols
BLOCK_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
FLOAT_EPS = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from helpers.hf_models import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("gguf_llama"), "llama3", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Every matrix 256 columns wide: the K-quants' block of 256."""
    from helpers.hf_models import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("gguf_wide"), "llama3", vocab_size=VOCAB,
                         hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)


def assert_holds_file_values(out, gguf_path):
    """Every converted tensor equals the GGUF's dequantized value, up to the dtype's rounding."""
    want, got = gguf_weights(gguf_path), read_tensors(out)
    assert set(got) == set(want)
    for name, value in want.items():
        eps = FLOAT_EPS[got[name].dtype]
        diff = (got[name].float() - value).abs().max().item()
        assert diff <= eps * value.abs().max().item(), f"{name}: {diff}"


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_convert_to_the_files_values(llama, tmp_path, qtype):
    path = write_gguf(llama[0], tmp_path / "m.gguf", qtype)
    out = convert_gguf(path, tmp_path / "out")
    assert_holds_file_values(out, path)
    stored = read_tensors(out)["model.layers.0.mlp.up_proj.weight"].dtype
    assert stored == {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quants_convert_to_the_files_values(wide_llama, tmp_path, qtype):
    types = {f"blk.0.{p}.weight": qtype for p in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    path = write_gguf(wide_llama[0], tmp_path / "m.gguf", types)
    out = convert_gguf(path, tmp_path / "out")
    assert_holds_file_values(out, path)


@torch.no_grad()
@pytest.mark.parametrize(("qtype", "atol"), [(Q.F32, 1e-4), (Q.Q8_0, 0.05)],
                         ids=["F32", "Q8_0"])
def test_round_trip_gives_the_original_models_logits(llama, tmp_path, qtype, atol):
    """HF -> GGUF (Q/K rows reordered as llama.cpp does) -> convert: the original's logits."""
    hf_dir, hf_model = llama
    out = convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", qtype), tmp_path / "out")
    tokens = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(1))
    ours = load_model(out)(tokens, 0)
    ref = hf_model(tokens[None]).logits[0]
    assert (ours - ref).abs().max().item() <= atol


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama32"])
def test_logits_equal_transformers_own_gguf_load(tmp_path, family):
    import transformers
    from helpers.hf_models import make_hf_model

    hf_dir, _ = make_hf_model(tmp_path, family, vocab_size=VOCAB)
    path = write_gguf(hf_dir, tmp_path / "m.gguf", Q.Q4_1)
    out = convert_gguf(path, tmp_path / "out")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(2))
    ours = load_model(out)(tokens, 0)
    ref = reference(tokens[None]).logits[0].float()
    assert (ours - ref).abs().max().item() <= 1e-4


def test_config_follows_the_metadata(llama, tmp_path):
    hf_dir, _ = llama
    path = write_gguf(hf_dir, tmp_path / "m.gguf", Q.Q8_0)
    out = convert_gguf(path, tmp_path / "out")
    original = json.loads((hf_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "rms_norm_eps",
                "bos_token_id", "eos_token_id"):
        assert config[key] == original[key], key
    assert config["rope_theta"] == original["rope_parameters"]["rope_theta"]
    assert config["tie_word_embeddings"] is False and config["architectures"] == [
        "LlamaForCausalLM"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for m in messages %}")
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False


def test_tied_embedding_when_there_is_no_output_tensor(tmp_path):
    from helpers.hf_models import make_hf_model

    hf_dir, _ = make_hf_model(tmp_path, "llama32", vocab_size=VOCAB)
    out = convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf"), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in read_tensors(out)


def test_llama3_rope_scaling_is_read_from_rope_freqs(llama, tmp_path):
    """llama.cpp stores Llama 3.1 scaling only as per-frequency factors."""
    import gguf
    import numpy as np

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    original = json.loads((llama[0] / "config.json").read_text())
    head_dim = original["hidden_size"] // original["num_attention_heads"]
    factors = llama3_factors(head_dim, 500000.0, scaling).astype(np.float32)
    path = _with_extra_tensor(llama[0], tmp_path, "rope_freqs.weight", factors)
    config = json.loads((convert_gguf(path, tmp_path / "out") / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    bad = _with_extra_tensor(llama[0], tmp_path / "bad", "rope_freqs.weight", factors * 1.5)
    with pytest.raises(GGUFError, match="rope_freqs"):
        convert_gguf(bad, tmp_path / "bad-out")
    assert gguf  # the writer's module, used by the helper


def _with_extra_tensor(hf_dir, tmp_path, name, values):
    import gguf

    tmp_path.mkdir(exist_ok=True)
    plain = write_gguf(hf_dir, tmp_path / "plain.gguf")
    reader = gguf.GGUFReader(plain)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data)
    writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "m.gguf"


def test_weights_are_written_in_bounded_files_with_an_index(llama, tmp_path):
    path = write_gguf(llama[0], tmp_path / "m.gguf")
    out = convert_gguf(path, tmp_path / "out", max_file_bytes=64 << 10)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (out / "model.safetensors").exists()
    largest = max(t.numel() * 4 for t in read_tensors(out).values())
    assert all((out / f).stat().st_size <= max(64 << 10, largest) + 4096 for f in files)
    assert_holds_file_values(out, path)


def test_progress_reports_every_tensor_up_to_the_total(llama, tmp_path):
    seen = []
    path = write_gguf(llama[0], tmp_path / "m.gguf")
    convert_gguf(path, tmp_path / "out", lambda name, done, total: seen.append((name, done,
                                                                                total)))
    assert len(seen) == len(read_tensors(tmp_path / "out"))
    assert seen[-1][1] == seen[-1][2] and [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


# -- errors ------------------------------------------------------------------------------------


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_file_is_a_clear_error(llama, tmp_path):
    path = write_gguf(llama[0], tmp_path / "m.gguf")
    data = path.read_bytes()
    for keep in (len(data) - 1000, 600):
        cut = tmp_path / f"cut-{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(GGUFError, match="truncated|not a readable GGUF"):
            GGUFFile(cut)


def test_an_unsupported_architecture_is_a_clear_error(llama, tmp_path):
    path = write_gguf(llama[0], tmp_path / "m.gguf")
    data = path.read_bytes().replace(b"llama", b"gemma", 1)  # general.architecture
    (tmp_path / "g.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match="'gemma' model"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out")


def test_an_unsupported_tensor_type_is_a_clear_error(wide_llama, tmp_path):
    import gguf
    import numpy as np

    path = write_gguf(wide_llama[0], tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    target = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q2_K]
    assert block == 256 and target.data.nbytes >= 256 * size  # room to retag it in place
    data = bytearray(path.read_bytes())
    # the tensor's type field follows its name, dims count and dims in the header
    name = target.name.encode()
    at = data.index(name) + len(name) + 4 + 8 * len(target.shape)
    data[at:at + 4] = int(Q.Q2_K).to_bytes(4, "little")
    (tmp_path / "q2.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="Q2_K"):
        convert_gguf(tmp_path / "q2.gguf", tmp_path / "out")
    assert np  # numpy is gguf's array type here


def test_a_non_empty_output_directory_needs_force(llama, tmp_path):
    path = write_gguf(llama[0], tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        convert_gguf(path, tmp_path / "out")
    convert_gguf(path, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if "converting" in p.name]
    shutil.rmtree(tmp_path / "out")
