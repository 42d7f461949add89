"""How a split stores the lm_head (``--head-dtype``): int8 by default in an int4 split, a tied
head included; the manifest of every rank records it, the split's reuse and the local
cluster's cache key depend on it, the loader builds the head it records, and the planner
predicts the files as written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers.hf_models import VOCAB

from edgetp.cli.main import main
from edgetp.config.model import load_model_config
from edgetp.model.llama import LogitsHead, Transformer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.loader import load_rank
from edgetp.parallel.qlinear import QuantLinear
from edgetp.perf.planner import Storage
from edgetp.perf.planner.memory import rank_memory
from edgetp.runtime.local import split_cache_dir
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import ShardError, read_manifest
from edgetp.shard.plan import make_plan
from edgetp.shard.quant import QuantError, head_format
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 32
HEAD_CODES = {"int8": "I8", "int4": "U8"}


def load_all(dirs: list[Path]) -> list[Transformer]:
    group = InProcessGroup(len(dirs))
    return [load_rank(d, group.communicator(r), max_seq_len=MAX_SEQ_LEN)
            for r, d in enumerate(dirs)]


def test_head_format_defaults_to_int8_for_int4_and_to_the_layers_otherwise() -> None:
    assert head_format("int4", None, "bfloat16") == "int8"
    assert head_format("int8", None, "bfloat16") == "int8"
    assert head_format("float32", None, "float32") == "float32"
    assert head_format("int4", "same", "bfloat16") == "int4"
    assert head_format("int4", "float", "bfloat16") == "bfloat16"
    assert head_format("float32", "int8", "float32") == "int8"
    with pytest.raises(QuantError, match="--head-dtype"):
        head_format("int4", "int2", "float32")


def test_an_int4_split_keeps_a_tied_head_in_int8(tiny_model_dir, tmp_path: Path) -> None:
    model_dir, _ = tiny_model_dir("llama32")  # tie_word_embeddings
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype="int4").rank_dirs
    manifests = [read_manifest(d) for d in dirs]
    assert all(m.dtype == "int4" and m.head_dtype == "int8" for m in manifests)
    head = manifests[0].files["head.safetensors"].tensors
    scale = head["lm_head.weight_scale"]  # float16 (scale, low) per row and 32 columns
    assert head["lm_head.weight"].dtype == "I8" and scale.dtype == "F16"
    assert scale.shape == (2, VOCAB, head["lm_head.weight"].shape[1] // 32)
    assert manifests[0].files[layer_file(0)].tensors["mlp.up_proj.weight"].dtype == "U8"
    model = load_all(dirs)[0]
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == "int8"
    assert model.lm_head.float_output
    layer = model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.fmt == "int4"


@pytest.mark.parametrize(("family", "dtype", "head", "stored"), [
    ("llama32", "int4", "int4", "int4"),
    ("llama32", "int4", "same", "int4"),
    ("llama32", "int4", "float", "float32"),
    ("llama3", "int4", "float", "float32"),
    ("llama3", "float32", "int8", "int8"),
    ("llama32", "bfloat16", "int4", "int4"),
])
def test_every_head_dtype_is_recorded_loaded_and_planned(tiny_model_dir, tmp_path: Path,
                                                        family: str, dtype: str, head: str,
                                                        stored: str) -> None:
    model_dir, _ = tiny_model_dir(family)
    config = load_model_config(model_dir)
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype=dtype, head_dtype=head).rank_dirs
    manifest = read_manifest(dirs[0])
    assert manifest.head_format == stored
    head_file = manifest.files["head.safetensors"].tensors
    model = load_all(dirs)[0]
    if stored in HEAD_CODES:
        assert head_file["lm_head.weight"].dtype == HEAD_CODES[stored]
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == stored
    else:
        assert isinstance(model.lm_head, LogitsHead)
        assert ("lm_head.weight" in head_file) == (not config.tie_word_embeddings)
        if config.tie_word_embeddings:
            assert model.lm_head.weight is model.embed_tokens.weight
    floats = "float32" if dtype in HEAD_CODES else dtype
    storage = Storage.of(dtype, "float32", compute_dtype=floats, head=head)
    plan = make_plan(config, 2)
    for rank, directory in enumerate(dirs):
        predicted = rank_memory(config, plan, rank, storage, MAX_SEQ_LEN)
        assert predicted.file_sizes == {name: (directory / name).stat().st_size
                                        for name in read_manifest(directory).files}


def test_another_head_dtype_is_another_split(tiny_model_dir, tmp_path: Path) -> None:
    model_dir, _ = tiny_model_dir("llama3")
    split_checkpoint(model_dir, tmp_path, 2, dtype="int4")
    assert split_checkpoint(model_dir, tmp_path, 2, dtype="int4", head_dtype="int8").skipped
    with pytest.raises(ShardError, match="--force"):
        split_checkpoint(model_dir, tmp_path, 2, dtype="int4", head_dtype="int4")
    result = split_checkpoint(model_dir, tmp_path, 2, dtype="int4", head_dtype="int4",
                              force=True)
    assert not result.skipped and read_manifest(result.rank_dirs[0]).head_dtype == "int4"
    keys = {split_cache_dir(model_dir, 2, None, "int4", 0, 32, head)
            for head in (None, "int8", "int4", "float")}
    assert len(keys) == 4
    assert split_cache_dir(model_dir, 2, None, "int4", 0) == split_cache_dir(
        model_dir, 2, None, "int4", 0, 32, None)  # splits cached before the flag stay found


def test_cli_split_takes_head_dtype(tiny_model_dir, tmp_path: Path) -> None:
    model_dir, _ = tiny_model_dir("llama3")
    result = CliRunner().invoke(main, ["split", str(model_dir), "--nodes", "2", "--out",
                                       str(tmp_path), "--dtype", "int4", "--head-dtype", "int4"])
    assert result.exit_code == 0, result.output
    assert "dtype int4, group 32)" in result.output
    assert read_manifest(tmp_path / "rank-0").head_dtype == "int4"
    default = CliRunner().invoke(main, ["split", str(model_dir), "--nodes", "2", "--out",
                                        str(tmp_path / "d"), "--dtype", "int4"])
    assert "lm_head int8" in default.output
    bad = CliRunner().invoke(main, ["split", str(model_dir), "--nodes", "2", "--out",
                                    str(tmp_path / "x"), "--head-dtype", "int2"])
    assert bad.exit_code != 0 and "--head-dtype" in bad.output


def test_logits_of_a_quantized_head_follow_the_float_head(tiny_model_dir, tmp_path: Path
                                                          ) -> None:
    model_dir, _ = tiny_model_dir("llama32")
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(3))
    logits = {}
    for head in ("float", "int8", "int4"):
        dirs = split_checkpoint(model_dir, tmp_path / head, 1, dtype="int4",
                                head_dtype=head).rank_dirs
        (model,) = load_all(dirs)
        with torch.inference_mode():
            logits[head] = model(prompt)
    assert all(v.dtype == torch.float32 for v in logits.values())
    error = {h: float((logits[h] - logits["float"]).abs().max()) for h in ("int8", "int4")}
    assert 0 < error["int8"] < error["int4"]  # int8 is the closer to the unquantized head
