"""edgetp.model.checkpoint: sharded and single-file safetensors, dtypes, and every
user-caused error."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from helpers.hf_models import FAMILIES, VOCAB, read_tensors, save_sharded_hf, write_checkpoint

from edgetp.config.model import load_model_config
from edgetp.core.errors import ConfigError
from edgetp.model.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    expected_tensor_names,
    load_model,
)

TOKENS = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits_of(model_dir, **kwargs) -> torch.Tensor:
    return load_model(model_dir, **kwargs)(TOKENS, 0)


@pytest.mark.parametrize("family", ["llama3", "llama32", "qwen2", "mlp_bias"])
def test_sharded_index_equals_single_file(tiny_model_dir, tmp_path, family):
    path, _ = tiny_model_dir(family)
    sharded = write_checkpoint(path, tmp_path / "sharded", num_shards=3)
    assert (sharded / INDEX_FILE).is_file() and not (sharded / SINGLE_FILE).exists()
    shard_files = set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shard_files) == 3
    assert torch.equal(logits_of(sharded), logits_of(path))


def test_transformers_sharded_save_loads(tiny_model_dir, tmp_path):
    path, hf = tiny_model_dir("llama32")
    sharded = save_sharded_hf(hf, tmp_path / "hf_sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits_of(sharded), logits_of(path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_checkpoints_load_as_float32(tiny_model_dir, tmp_path, dtype):
    path, _ = tiny_model_dir("attn_bias")
    name = str(dtype).removeprefix("torch.")
    half = write_checkpoint(
        path, tmp_path / "half", dtype=dtype, config_updates={"dtype": name, "torch_dtype": name}
    )
    assert all(t.dtype == dtype for t in read_tensors(half).values())
    model = load_model(half)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Exactly the upcast of the stored values: same logits as a float32 file of them.
    rounded = write_checkpoint(half, tmp_path / "rounded", dtype=torch.float32)
    assert torch.equal(logits_of(half), logits_of(rounded))
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = model.lm_head.weight
    for name_, stored in read_tensors(half).items():
        assert torch.equal(state[name_], stored.float()), name_
    # And close to the float32 original.
    assert (logits_of(half) - logits_of(path)).abs().max().item() < 0.25


def test_half_checkpoint_loads_as_bfloat16(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    half = write_checkpoint(path, tmp_path / "fp16", dtype=torch.float16)
    model = load_model(half, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(model(TOKENS, 0)).all()


def test_unsupported_tensor_dtype_raises(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    wide = write_checkpoint(path, tmp_path / "fp64", dtype=torch.float64)
    with pytest.raises(CheckpointError, match="float64"):
        load_model(wide)


def write_config(directory, **raw):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


GPT2 = {
    "vocab_size": 128,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
}


def test_unsupported_architecture_raises_config_error(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    gpt2 = write_checkpoint(
        path,
        tmp_path / "gpt2",
        config_updates={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
    )
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        load_model(gpt2)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        load_model_config(gpt2)


def test_unsupported_model_type_without_architectures_raises(tmp_path):
    directory = write_config(tmp_path / "gpt2", model_type="gpt2", **GPT2)
    with pytest.raises(ConfigError, match="gpt2"):
        load_model_config(directory)


def test_missing_config_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("num_shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize(
    ("family", "dropped"),
    [
        ("llama3", "model.layers.1.self_attn.k_proj.weight"),
        ("llama3", "lm_head.weight"),
        ("qwen2", "model.layers.0.self_attn.v_proj.bias"),
        ("attn_bias", "model.layers.1.self_attn.o_proj.bias"),
        ("mlp_bias", "model.layers.0.mlp.down_proj.bias"),
        ("llama32", "model.norm.weight"),
    ],
)
def test_missing_tensor_raises_checkpoint_error_naming_it(
    tiny_model_dir, tmp_path, family, dropped, num_shards
):
    path, _ = tiny_model_dir(family)
    assert dropped in read_tensors(path)
    broken = write_checkpoint(path, tmp_path / "broken", num_shards=num_shards, drop=(dropped,))
    with pytest.raises(CheckpointError, match=dropped.replace(".", r"\.")):
        load_model(broken)


def test_directory_without_weights_raises_checkpoint_error(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(empty)
    with pytest.raises(CheckpointError):
        Checkpoint(empty)


def test_missing_shard_file_raises_checkpoint_error(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    sharded = write_checkpoint(path, tmp_path / "sharded", num_shards=3)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(sharded)


def test_corrupt_index_raises_checkpoint_error(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    sharded = write_checkpoint(path, tmp_path / "sharded", num_shards=2)
    (sharded / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        Checkpoint(sharded)
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="index"):
        Checkpoint(sharded)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expected_tensor_names_match_transformers_checkpoint(tiny_model_dir, family):
    path, _ = tiny_model_dir(family)
    config = load_model_config(path)
    expected = expected_tensor_names(config)
    assert len(expected) == len(set(expected))
    assert set(expected) == set(Checkpoint(path).names)


@pytest.mark.parametrize("num_shards", [1, 3], ids=["single", "sharded"])
def test_iter_tensors_yields_every_tensor_once(tiny_model_dir, tmp_path, num_shards):
    path, _ = tiny_model_dir("qwen2")
    directory = write_checkpoint(path, tmp_path / "ckpt", num_shards=num_shards)
    reference = read_tensors(path)
    checkpoint = Checkpoint(directory)
    seen = list(checkpoint.iter_tensors())
    counts = Counter(name for name, _ in seen)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)
    assert set(counts) == set(reference) == set(checkpoint.names)
    for name, tensor in seen:
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("num_shards", [1, 3], ids=["single", "sharded"])
def test_get_slice_and_shape(tiny_model_dir, tmp_path, num_shards):
    path, _ = tiny_model_dir("attn_bias")
    directory = write_checkpoint(path, tmp_path / "ckpt", num_shards=num_shards)
    checkpoint = Checkpoint(directory)
    reference = read_tensors(path)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
    ):
        full = reference[name]
        assert checkpoint.shape_of(name) == list(full.shape)
        assert torch.equal(checkpoint.get(name), full)
        for dim in range(full.dim()):
            size = full.shape[dim]
            for start, stop in [(0, size // 2), (size // 4, size), (3, 5), (0, size)]:
                got = checkpoint.get_slice(name, dim, start, stop)
                assert torch.equal(got, full.narrow(dim, start, stop - start)), (
                    name,
                    dim,
                    start,
                    stop,
                )
    with pytest.raises(CheckpointError, match="no_such_tensor"):
        checkpoint.get_slice("model.no_such_tensor", 0, 0, 1)
    with pytest.raises(CheckpointError, match="no_such_tensor"):
        checkpoint.get("model.no_such_tensor")


@pytest.mark.parametrize(
    ("update", "tensor", "stored", "implied"),
    [
        ({"vocab_size": 100}, "embed_tokens.weight", [128, 64], [100, 64]),
        ({"intermediate_size": 80}, "layers.0.mlp.gate_proj.weight", [96, 64], [80, 64]),
        ({"num_key_value_heads": 4}, "layers.0.self_attn.k_proj.weight", [16, 64], [32, 64]),
    ],
    ids=["vocab_size", "intermediate_size", "num_key_value_heads"],
)
def test_config_shape_mismatch_raises_checkpoint_error_naming_tensor(
    tiny_model_dir, tmp_path, update, tensor, stored, implied
):
    """config.json disagreeing with the weights is caught at load time (regression)."""
    path, _ = tiny_model_dir("llama3")  # 8 heads of 8 dims, 2 KV heads, intermediate 96
    broken = write_checkpoint(path, tmp_path / "mismatch", config_updates=update)
    load_model_config(broken)  # the config alone is self-consistent
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")) as info:
        load_model(broken)
    message = str(info.value)
    assert str(stored) in message and str(implied) in message, message


@pytest.mark.parametrize("keep", [4, 100, -10], ids=["in-magic", "in-header", "in-data"])
def test_truncated_safetensors_raises_checkpoint_error(tiny_model_dir, tmp_path, keep):
    path, _ = tiny_model_dir("llama3")
    broken = write_checkpoint(path, tmp_path / "truncated")
    target = broken / SINGLE_FILE
    data = target.read_bytes()
    target.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_model(broken)
    assert SINGLE_FILE in str(info.value)


def test_truncated_shard_raises_checkpoint_error(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    sharded = write_checkpoint(path, tmp_path / "sharded", num_shards=3)
    victim = sorted(sharded.glob("model-*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(sharded)
    with pytest.raises(CheckpointError, match=victim.name):
        list(Checkpoint(sharded).iter_tensors())


def test_index_pointing_at_wrong_shard_raises_checkpoint_error(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    sharded = write_checkpoint(path, tmp_path / "sharded", num_shards=3)
    index = json.loads((sharded / INDEX_FILE).read_text())
    victim = "model.layers.1.self_attn.k_proj.weight"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][victim] = next(s for s in shards if s != index["weight_map"][victim])
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    pattern = victim.replace(".", r"\.")
    with pytest.raises(CheckpointError, match=pattern):
        load_model(sharded)
    checkpoint = Checkpoint(sharded)
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.get(victim)
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.get_slice(victim, 0, 0, 1)
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.shape_of(victim)
    with pytest.raises(CheckpointError, match=pattern):
        list(checkpoint.iter_tensors())
