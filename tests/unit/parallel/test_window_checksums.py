"""Every weight the window re-reads from disk is checked against the checksums the splitter
recorded (``edgetp.shard.checksums``, ``edgetp.parallel.blocks``):

* the manifest has an xxh3_64 for every tensor (the embedding one per chunk of whole rows), and
  they match the bytes;
* a streamed block whose file is overwritten after loading (same size, old mtime put back)
  fails the next forward with a ``WindowError`` naming the file, the block and the bytes, and
  saying to restore the file or split again; so do the embedding's rows and, at load, a
  pinned block;
* the time spent checking is counted apart (``WindowStats.check_s``);
* a manifest of an older edgetp (no checksums) still loads, with a warning.

A worker process with a changed shard file: tests/integration/test_shard_changed.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers.deadline import call_with_deadline
from helpers.files import flip_bytes

from edgetp.parallel.blocks import WindowError
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank, shard_memory_needs
from edgetp.shard.checksums import EMBED_CHUNK_BYTES, chunk_bytes, first_mismatch
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import MANIFEST_NAME, Manifest, ShardError, read_manifest
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 64
N_LAYERS = 4
DEADLINE_S = 20.0
RESTORE = "restore the file or split the model again"


@pytest.fixture
def shard(tiny_model_dir, tmp_path) -> Path:
    """rank-0 of a one-node split of a tiny model (private to the test: tests damage it)."""
    model_dir, _ = tiny_model_dir("llama3", num_hidden_layers=N_LAYERS)
    return split_checkpoint(model_dir, tmp_path / "split", 1).rank_dirs[0]


def load_streaming(shard: Path, budget: int | None = None, verify: bool = True):
    """The shard with every block streamed (its minimum budget), unless ``budget`` says."""
    minimum = shard_memory_needs(shard, max_seq_len=MAX_SEQ_LEN).minimum()
    return load_rank(shard, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN, verify=verify,
                     memory_budget=budget or minimum)


def forward(model, tokens: torch.Tensor) -> torch.Tensor:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(tokens, 0)

    return call_with_deadline(run, DEADLINE_S, "a forward through the window")


PROMPT = torch.tensor([1, 7, 19, 42, 3, 11])


def test_every_tensor_has_checksums_that_match_its_bytes(shard):
    manifest = read_manifest(shard)
    for file_name, file in manifest.files.items():
        data = (shard / file_name).read_bytes()
        for name, entry in file.tensors.items():
            assert entry.xxh3, f"{file_name}:{name} has no checksum"
            start, stop = entry.offsets
            assert first_mismatch(entry, data[start:stop]) is None
            if name == "embed_tokens.weight":
                row = (stop - start) // entry.shape[0]
                assert entry.xxh3_chunk % row == 0 and entry.xxh3_chunk <= EMBED_CHUNK_BYTES
                assert chunk_bytes(entry, len(entry.xxh3) - 1)[1] == stop
            else:
                assert entry.xxh3_chunk == 0 and len(entry.xxh3) == 1
    assert Manifest.from_dict(manifest.to_dict()).files == manifest.files


def test_a_malformed_checksum_is_a_malformed_manifest(shard):
    data = json.loads((shard / MANIFEST_NAME).read_text())
    data["files"][layer_file(0)]["tensors"]["mlp.up_proj.weight"]["xxh3_64"] = "abc"
    with pytest.raises(ShardError, match="malformed.*split the model again"):
        Manifest.from_dict(data)


def test_a_streamed_block_changed_after_load_fails_naming_file_and_block(shard):
    model = load_streaming(shard)
    try:
        forward(model, PROMPT)  # every block read (and checked) once
        victim = shard / layer_file(N_LAYERS - 1)
        entry = read_manifest(shard).files[victim.name].tensors["mlp.down_proj.weight"]
        flip_bytes(victim, entry.offsets[0] + 64, keep_mtime=True)  # same size, same mtime
        with pytest.raises(WindowError) as info:
            forward(model, PROMPT)
        message = str(info.value)
        assert str(victim) in message and f"block layers.{N_LAYERS - 1}.mlp" in message
        assert f"bytes {entry.offsets[0]}-{entry.offsets[1]}" in message and RESTORE in message
    finally:
        model.window.close()


def test_changed_embedding_rows_fail_the_lookup(shard):
    model = load_streaming(shard)
    try:
        forward(model, PROMPT)
        entry = read_manifest(shard).files["embed.safetensors"].tensors["embed_tokens.weight"]
        row = (entry.offsets[1] - entry.offsets[0]) // entry.shape[0]
        flip_bytes(shard / "embed.safetensors", entry.offsets[0] + int(PROMPT[2]) * row, 8)
        with pytest.raises(WindowError, match=r"embed\.safetensors changed on disk.*block "
                                              r"embed_tokens.*" + RESTORE):
            forward(model, PROMPT)
    finally:
        model.window.close()


def test_a_pinned_block_is_checked_when_it_is_read(shard):
    entry = read_manifest(shard).files[layer_file(0)].tensors["self_attn.q_proj.weight"]
    flip_bytes(shard / layer_file(0), entry.offsets[0])
    needs = shard_memory_needs(shard, max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(WindowError, match=r"block layers\.0\.self_attn"):
        load_streaming(shard, budget=needs.total - 1, verify=False)  # most blocks pinned


def test_the_time_spent_checking_is_counted(shard):
    model = load_streaming(shard)
    try:
        model.window.take_stats()
        forward(model, PROMPT)
        stats = model.window.take_stats()
        assert stats.blocks_read > 0 and 0 < stats.check_s <= stats.read_s
    finally:
        model.window.close()


def test_a_manifest_without_checksums_loads_with_a_warning(shard, tmp_path, caplog):
    old = Path(shutil.copytree(shard, tmp_path / "old"))
    data = json.loads((old / MANIFEST_NAME).read_text())
    for file in data["files"].values():
        for entry in file["tensors"].values():
            entry.pop("xxh3_64"), entry.pop("xxh3_64_chunk", None)
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    checked, unchecked = load_streaming(shard), None
    try:
        with caplog.at_level(logging.WARNING, logger="edgetp.parallel.loader"):
            unchecked = load_streaming(old)
        assert "not checked; split the model again" in caplog.text
        assert torch.equal(forward(unchecked, PROMPT), forward(checked, PROMPT))
    finally:
        checked.window.close()
        if unchecked is not None:
            unchecked.window.close()
