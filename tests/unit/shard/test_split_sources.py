"""A split is checked against the model's files by content (``edgetp.shard.sources``,
``edgetp.shard.stamps``), so it is never used stale and rarely read again:

* an unchanged model is not hashed again (one stat per file: ``SplitResult.rehashed`` is empty)
  and not split again;
* a file whose stamp changed but whose bytes did not is hashed once, then known again;
* new weights of the same shapes saved in place (mtime kept or put back) make the split stale:
  an error naming the file, or with ``force`` a new split that computes the new model;
* a new chat template (tokenizer_config.json), a chat_template.jinja added or removed: only
  rank-0's copies change, the weight files stay;
* hashes are taken only once a file's ctime is a clock tick old, and a file that changes while
  it is hashed is an error;
* a shard file overwritten with its old modification time is caught at load (the
  ``.verified.json`` stamp has the ctime).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers.files import flip_bytes, resave_safetensors, stat_key
from helpers.parallel import sharded_logits, unsharded_logits

from edgetp.model.checkpoint import load_model
from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.model.tokenizer import Tokenizer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.loader import load_rank
from edgetp.shard import stamps
from edgetp.shard.manifest import ShardError, read_manifest
from edgetp.shard.sources import COPIED_FILES, SOURCE_RECORD_NAME
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 32
ATOL = 1e-5
WEIGHTS = "model.safetensors"
NEW_TEMPLATE = "{{ bos_token }}count by 2 : 4"


@pytest.fixture
def model(tmp_path) -> Path:
    """A private copy of the demo model (four layers, with a tokenizer and chat template)."""
    return Path(shutil.copytree(DEMO_MODEL_DIR, tmp_path / "model"))


def weight_files(out: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime, inode) of the split's weight files, manifests and config: a rewrite
    shows (the tokenizer files copied for the master are left out)."""
    return {str(p.relative_to(out)): stat_key(p) for p in sorted(out.rglob("*"))
            if p.suffix in (".safetensors", ".json") and not p.name.startswith(".")
            and p.name not in COPIED_FILES}


def new_weights(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Different values of the same shape: a seeded perturbation of every matrix."""
    if tensor.dim() < 2:
        return tensor
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name)))
    return tensor + 0.05 * noise.to(tensor.dtype)


def cluster_logits(dirs: list[Path], tokens: torch.Tensor) -> torch.Tensor:
    return sharded_logits(
        lambda rank, comm: load_rank(dirs[rank], comm, max_seq_len=MAX_SEQ_LEN), len(dirs), tokens)


TOKENS = torch.tensor([1, 5, 9, 17, 33, 64, 80, 4])


def test_an_unchanged_model_is_neither_hashed_nor_split_again(model, tmp_path):
    first = split_checkpoint(model, tmp_path / "out", 2)
    assert not first.skipped and WEIGHTS in first.rehashed
    before = weight_files(tmp_path / "out")
    record = (tmp_path / "out" / "rank-0" / SOURCE_RECORD_NAME).read_bytes()
    again = split_checkpoint(model, tmp_path / "out", 2)
    assert again.skipped and again.rehashed == () and again.recopied == ()
    assert weight_files(tmp_path / "out") == before
    assert (tmp_path / "out" / "rank-0" / SOURCE_RECORD_NAME).read_bytes() == record


def test_a_touched_file_is_hashed_once_then_known(model, tmp_path):
    split_checkpoint(model, tmp_path / "out", 2)
    before = weight_files(tmp_path / "out")
    os.utime(model / WEIGHTS, ns=(time.time_ns(), time.time_ns() - 10**10))  # same bytes
    touched = split_checkpoint(model, tmp_path / "out", 2)
    assert touched.skipped and touched.rehashed == (WEIGHTS,)
    assert split_checkpoint(model, tmp_path / "out", 2).rehashed == ()  # the new stamp is kept
    assert weight_files(tmp_path / "out") == before


@pytest.mark.parametrize("keep_mtime", [True, False], ids=["mtime-put-back", "mtime-new"])
def test_new_weights_of_the_same_shapes_make_the_split_stale(model, tmp_path, keep_mtime):
    out = tmp_path / "out"
    old = cluster_logits(split_checkpoint(model, out, 2).rank_dirs, TOKENS)
    old_fingerprint = read_manifest(out / "rank-0").fingerprint
    key = stat_key(model / WEIGHTS)
    resave_safetensors(model / WEIGHTS, new_weights, keep_mtime=keep_mtime)
    if keep_mtime:
        assert stat_key(model / WEIGHTS) == key  # size, mtime and inode alone cannot tell
    with pytest.raises(ShardError, match=r"model's model\.safetensors changed.*--force"):
        split_checkpoint(model, out, 2)

    result = split_checkpoint(model, out, 2, force=True)
    assert not result.skipped and read_manifest(out / "rank-1").fingerprint != old_fingerprint
    ours = cluster_logits(result.rank_dirs, TOKENS)
    expected = unsharded_logits(load_model(model, max_seq_len=MAX_SEQ_LEN), TOKENS)
    assert (ours - expected).abs().max().item() <= ATOL
    assert (ours - old).abs().max().item() > 100 * ATOL  # the old split would have been wrong


def test_a_new_chat_template_is_copied_without_splitting_again(model, tmp_path):
    out = tmp_path / "out"
    split_checkpoint(model, out, 2)
    before = weight_files(out)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = NEW_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = split_checkpoint(model, out, 2)
    assert result.skipped and result.recopied == ("tokenizer_config.json",)
    assert Tokenizer.from_dir(out / "rank-0").chat_template == NEW_TEMPLATE
    assert weight_files(out) == before
    assert split_checkpoint(model, out, 2).recopied == ()


def test_a_chat_template_file_added_then_removed_follows_the_model(model, tmp_path):
    out = tmp_path / "out"
    split_checkpoint(model, out, 2)
    (model / "chat_template.jinja").write_text(NEW_TEMPLATE)
    assert split_checkpoint(model, out, 2).recopied == ("chat_template.jinja",)
    assert Tokenizer.from_dir(out / "rank-0").chat_template == NEW_TEMPLATE
    (model / "chat_template.jinja").unlink()
    assert split_checkpoint(model, out, 2).recopied == ("chat_template.jinja",)
    assert not (out / "rank-0" / "chat_template.jinja").exists()
    assert Tokenizer.from_dir(out / "rank-0").chat_template != NEW_TEMPLATE


def test_a_lost_source_record_costs_one_hash_not_a_split(model, tmp_path):
    out = tmp_path / "out"
    split_checkpoint(model, out, 2)
    before = weight_files(out)
    (out / "rank-0" / SOURCE_RECORD_NAME).unlink()
    result = split_checkpoint(model, out, 2)
    assert result.skipped and WEIGHTS in result.rehashed
    assert weight_files(out) == before


# -- hashing safely ----------------------------------------------------------------------------


def test_a_file_is_hashed_only_once_its_ctime_is_a_tick_old(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    _, stamp = stamps.settled_sha256(path)
    assert stamp is not None and stamp == stamps.FileStamp.of(path)
    assert time.time_ns() - stamp.ctime_ns >= stamps.RACY_FINE_NS


def test_a_file_that_keeps_changing_while_hashed_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    real = stamps.sha256_file

    def hash_while_written(target: Path) -> str:
        digest = real(target)
        target.write_bytes(os.urandom(1000))  # a writer still at work
        return digest

    monkeypatch.setattr(stamps, "sha256_file", hash_while_written)
    monkeypatch.setattr(stamps, "RACY_FINE_NS", 0)
    with pytest.raises(ShardError, match="kept changing while edgetp hashed it"):
        stamps.settled_sha256(path)


def test_a_shard_file_overwritten_with_its_old_mtime_is_caught_at_load(model, tmp_path):
    [rank0] = split_checkpoint(model, tmp_path / "out", 1).rank_dirs
    load_rank(rank0, InProcessGroup(1).communicator(0), max_seq_len=MAX_SEQ_LEN)  # recorded
    entry = read_manifest(rank0).files["layer-002.safetensors"].tensors["mlp.up_proj.weight"]
    flip_bytes(rank0 / "layer-002.safetensors", entry.offsets[0], keep_mtime=True)
    with pytest.raises(ShardError, match=r"layer-002\.safetensors fails its sha256 check"):
        load_rank(rank0, InProcessGroup(1).communicator(0), max_seq_len=MAX_SEQ_LEN)
