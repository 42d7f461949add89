"""Synthetic splits (edgetp.shard.synthetic): the real splitter's layout, loadable, seeded,
weights of the intended size, deep models that stay finite, and a clear error without disk."""

from __future__ import annotations

import json
import math
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgetp.cli.main import main
from edgetp.core.errors import ConfigError, ShardError
from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.model.synthetic import llama_config, write_model
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank
from edgetp.shard import synthetic
from edgetp.shard.manifest import read_manifest, verify_directory
from edgetp.shard.quant import dequantize_int4, dequantize_int8
from edgetp.shard.split import split_checkpoint
from edgetp.shard.synthetic import write_synthetic_split

CONFIG = llama_config(hidden=256, intermediate=640, layers=3, heads=8, kv_heads=4, vocab=320,
                      torch_dtype="bfloat16")
PROMPT = torch.tensor([1, 17, 42, 99, 7, 250, 3, 64])


def layout(split: Path) -> list[dict[str, dict[str, tuple[str, tuple[int, ...]]]]]:
    """Per rank: file name -> tensor -> (dtype, shape), from the manifests."""
    ranks = sorted(split.glob("rank-*"))
    return [{name: {t: (e.dtype, e.shape) for t, e in f.tensors.items()}
             for name, f in read_manifest(d).files.items()} for d in ranks]


@pytest.mark.parametrize(("dtype", "ranks"), [("int4", 2), ("int8", 3), ("bfloat16", 2)])
def test_the_layout_is_the_real_splitters(tmp_path: Path, dtype: str, ranks: int) -> None:
    config = {**CONFIG, "torch_dtype": "float32"}  # a quantized split keeps float32 floats
    # a synthetic split stores its head as the layers (the real splitter's int4 default is int8)
    real = split_checkpoint(write_model(tmp_path / "model", config), tmp_path / "real", ranks,
                            dtype=dtype, head_dtype="same")
    fake = write_synthetic_split(config, tmp_path / "fake", ranks, dtype)
    assert layout(fake.out_dir) == layout(real.out_dir)
    for rank, directory in enumerate(fake.rank_dirs):
        manifest, reference = read_manifest(directory), read_manifest(real.rank_dirs[rank])
        assert (manifest.plan, manifest.dtype, manifest.group_size, manifest.model_config) == (
            reference.plan, reference.dtype, reference.group_size, reference.model_config)
        verify_directory(directory, manifest)  # sizes and sha256 as the manifest says
        assert all(e.xxh3 for f in manifest.files.values() for e in f.tensors.values())
    def visible(directory: Path) -> list[str]:
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))

    assert visible(fake.rank_dirs[0]) == visible(real.rank_dirs[0])


def test_same_seed_same_bytes_and_a_split_is_reused(tmp_path: Path) -> None:
    first = write_synthetic_split(CONFIG, tmp_path / "a", 2, seed=3)
    again = write_synthetic_split(CONFIG, tmp_path / "b", 2, seed=3, threads=1)
    other = write_synthetic_split(CONFIG, tmp_path / "c", 2, seed=4)
    # the tensors' checksums (a file's header orders its metadata as safetensors pleases)
    sums = [{(n, t): e.xxh3 for n, f in read_manifest(r.rank_dirs[1]).files.items()
             for t, e in f.tensors.items() if "norm" not in t} for r in (first, again, other)]
    assert sums[0] == sums[1] and not set(sums[0].values()) & set(sums[2].values())
    assert write_synthetic_split(CONFIG, tmp_path / "a", 2, seed=3).skipped
    with pytest.raises(ShardError, match="--force"):
        write_synthetic_split(CONFIG, tmp_path / "a", 2, seed=3, dtype="int8")
    forced = write_synthetic_split(CONFIG, tmp_path / "a", 2, seed=3, dtype="int8", force=True)
    assert not forced.skipped and read_manifest(forced.rank_dirs[0]).dtype == "int8"


def test_quantized_weights_have_the_intended_spread(tmp_path: Path) -> None:
    split = write_synthetic_split(CONFIG, tmp_path / "s4", 1, "int4")
    from safetensors.torch import load_file

    tensors = load_file(split.rank_dirs[0] / "layer-001.safetensors")
    w4 = dequantize_int4(tensors["mlp.up_proj.weight"], tensors["mlp.up_proj.weight_scale"])
    split8 = write_synthetic_split(CONFIG, tmp_path / "s8", 1, "int8")
    tensors = load_file(split8.rank_dirs[0] / "layer-001.safetensors")
    w8 = dequantize_int8(tensors["mlp.up_proj.weight"], tensors["mlp.up_proj.weight_scale"])
    assert tensors["mlp.up_proj.weight_scale"].shape == (2, 640, 256 // 32)  # blocks of 32
    for w in (w4, w8):  # [640, 256]: std 1 / sqrt(256)
        assert abs(float(w.std()) * 16 - 1) < 0.1
        assert abs(float(w.mean())) * 16 < 0.05
    down = dequantize_int8(tensors["mlp.down_proj.weight"], tensors["mlp.down_proj.weight_scale"])
    assert abs(float(down.std()) * math.sqrt(640 * 2 * 3) - 1) < 0.1  # residual: / sqrt(2 L)


def generate(shard: Path, steps: int = 6) -> tuple[torch.Tensor, list[int]]:
    """Logits of PROMPT and greedy tokens after it, on one rank holding the whole model."""
    model = load_rank(shard, SoloCommunicator(), max_seq_len=32)
    with torch.inference_mode():
        logits = model(PROMPT, 0)  # [T, vocab]
        position, token, tokens = len(PROMPT), int(logits[-1].argmax()), []
        for _ in range(steps):
            tokens.append(token)
            token = int(model(torch.tensor([token]), position)[-1].argmax())
            position += 1
    return logits, tokens


@pytest.mark.parametrize("dtype", ["int4", "int8", "bfloat16"])
def test_eighty_layers_stay_finite_and_varied(tmp_path: Path, dtype: str) -> None:
    deep = llama_config(hidden=128, intermediate=256, layers=80, heads=4, kv_heads=2, vocab=320,
                        torch_dtype="bfloat16")
    split = write_synthetic_split(deep, tmp_path / "deep", 1, dtype)
    logits, tokens = generate(split.rank_dirs[0])  # [8, 320]
    assert torch.isfinite(logits).all()
    assert float(logits.std(dim=-1).min()) > 0.5  # not flat: the tokens are chosen, not tied
    similarity = torch.corrcoef(logits).fill_diagonal_(0)  # positions kept apart, not averaged
    assert float(similarity.max()) < 0.8, similarity
    assert len({int(t) for t in logits.argmax(dim=-1)}) > 4 and len(set(tokens)) > 2


def test_too_little_disk_space_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda _path: usage(10**9, 0, 12345))
    with pytest.raises(ShardError, match=r"needs .* \(\d+ bytes\) but .* \(12345 bytes\) free"):
        write_synthetic_split(CONFIG, tmp_path / "full", 2)
    assert not list((tmp_path / "full").rglob("*.safetensors"))


def test_split_bytes_is_what_is_written(tmp_path: Path) -> None:
    result = write_synthetic_split(CONFIG, tmp_path / "s", 2, "int4")
    files = list(synthetic.synthetic_files(*_format(CONFIG, 2, "int4")))
    estimate = synthetic.split_bytes(files, _format(CONFIG, 2, "int4")[2])
    assert result.bytes_written <= estimate <= result.bytes_written + len(files) * (64 << 10)


def _format(config: dict, ranks: int, dtype: str):
    from edgetp.config.model import parse_hf_config
    from edgetp.shard.plan import make_plan

    cfg = parse_hf_config(config)
    plan = make_plan(cfg, ranks)
    return cfg, plan, synthetic.stored_format(cfg, plan, dtype, "bfloat16")


def test_bad_dtype_or_group(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dtype"):
        write_synthetic_split(CONFIG, tmp_path / "x", 2, "int3")
    with pytest.raises(ConfigError, match="--group-size"):
        write_synthetic_split(CONFIG, tmp_path / "x", 2, "int4", group_size=48)


def test_the_command(tmp_path: Path) -> None:
    model = tmp_path / "shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    out = tmp_path / "split"
    result = CliRunner().invoke(main, ["synth-split", "--preset", str(model), "--ranks", "2",
                                       "--layers", "2", "--dtype", "int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 rank directories" in result.output
    manifest = read_manifest(out / "rank-1")
    assert manifest.model_config.num_hidden_layers == 2 and manifest.dtype == "int8"
    assert sorted(manifest.files) == ["layer-000.safetensors", "layer-001.safetensors"]
    unknown = CliRunner().invoke(main, ["synth-split", "--preset", "llama9-1t", "--ranks", "2",
                                       "--out", str(tmp_path / "u")])
    assert unknown.exit_code == 1 and "presets:" in unknown.output
    shutil.rmtree(out)


def test_a_synthetic_models_tokenizer_has_a_word_for_every_id(tmp_path: Path) -> None:
    """Random weights pick any id: each decodes to text (a served model streams every token)."""
    from edgetp.model.tokenizer import Tokenizer

    config = llama_config(64, 128, 1, 4, 2, vocab=300)
    tokenizer = Tokenizer.from_dir(write_model(tmp_path / "model", config))
    assert tokenizer.decode([250]) == "w250" and tokenizer.decode([299]) == "w299"
    assert tokenizer.decode([5]) == Tokenizer.from_dir(DEMO_MODEL_DIR).decode([5])  # kept
