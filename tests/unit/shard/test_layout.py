"""edgetp.shard.layout: the names of a split directory (part of the on-disk format) and their
parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetp.shard.layout import (
    is_split_file,
    layer_file,
    rank_dir,
    rank_dirs,
    rank_of,
    shard_dir_of,
)
from edgetp.shard.manifest import MANIFEST_NAME


def test_names_on_disk_keep_their_format() -> None:
    assert rank_dir(Path("split"), 0) == Path("split/rank-0")
    assert rank_dir(Path("/data/split"), 12) == Path("/data/split/rank-12")
    assert layer_file(7) == "layer-007.safetensors"
    assert layer_file(123) == "layer-123.safetensors"


@pytest.mark.parametrize("rank", [0, 1, 9, 10, 199])
def test_a_rank_directory_parses_back_to_its_rank(rank: int) -> None:
    assert rank_of(rank_dir(Path("split"), rank)) == rank
    assert rank_of(f"rank-{rank}") == rank


@pytest.mark.parametrize("name", ["model", "rank-", "rank-a", "rank-1x", "xrank-1", "rank-1/x"])
def test_other_names_are_not_rank_directories(name: str) -> None:
    assert rank_of(Path("/models") / name) is None


def test_rank_dirs_lists_the_shards_that_have_a_manifest(tmp_path: Path) -> None:
    assert rank_dirs(tmp_path) == []
    for rank in (1, 0, 2):
        rank_dir(tmp_path, rank).mkdir()
        (rank_dir(tmp_path, rank) / MANIFEST_NAME).write_text("{}")
    (tmp_path / "rank-3").mkdir()  # no manifest: an interrupted split, not a shard
    (tmp_path / "logs").mkdir()
    assert rank_dirs(tmp_path) == [rank_dir(tmp_path, r) for r in (0, 1, 2)]


def test_shard_dir_of_accepts_a_split_or_a_shard(tmp_path: Path) -> None:
    split = tmp_path / "split"
    rank_dir(split, 0).mkdir(parents=True)
    rank_dir(split, 1).mkdir()
    assert shard_dir_of(split) == rank_dir(split, 0)
    assert shard_dir_of(split, 1) == rank_dir(split, 1)
    assert shard_dir_of(rank_dir(split, 1)) == rank_dir(split, 1)  # already a shard
    assert shard_dir_of(tmp_path / "elsewhere") == tmp_path / "elsewhere"


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_a_split_writes_only_names_the_layout_knows(tmp_path: Path, dtype: str | None) -> None:
    """Launch ships, and nodes accept, only these names: a split must write no other."""
    from edgetp.model.demo import DEMO_MODEL_DIR
    from edgetp.shard.sources import SOURCE_RECORD_NAME
    from edgetp.shard.split import TOKENIZER_FILES, split_checkpoint

    result = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 3, dtype=dtype)
    written = [path.name for directory in result.rank_dirs for path in directory.iterdir()]
    assert MANIFEST_NAME in written and "embed.safetensors" in written
    # rank 0's record of what the split was made from stays on this machine: never shipped
    assert SOURCE_RECORD_NAME in written and not is_split_file(SOURCE_RECORD_NAME)
    shipped = [name for name in written if name != SOURCE_RECORD_NAME]
    assert [name for name in shipped if not is_split_file(name)] == []
    assert all(is_split_file(name) for name in TOKENIZER_FILES)


@pytest.mark.parametrize("name", ["../layer-000.safetensors", "/etc/passwd", "rank-1/manifest.json",
                                  "layer-00.safetensors", "layer-000.safetensors.bak",
                                  ".manifest.json", "manifest.json\n", "", None, 3])
def test_anything_else_is_not_a_split_file(name: object) -> None:
    assert not is_split_file(name)
