"""Where a loaded rank's weights live: memory of its own, huge pages advised where a file's
tensors span them; never views of the shard files' mappings (page cache of 4 KiB pages)."""

from __future__ import annotations

import pytest
import torch
from helpers.mappings import mapping_of

from edgetp.core.pages import HUGE_PAGE, huge_pages_supported
from edgetp.model.checkpoint import load_model
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.loader import load_rank
from edgetp.shard.split import split_checkpoint

WIDE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4}  # a rank's layer file: ~7 MB


@pytest.fixture(scope="module")
def wide_split(tiny_model_dir, tmp_path_factory):
    model_dir, _ = tiny_model_dir("llama3", **WIDE)
    return split_checkpoint(model_dir, tmp_path_factory.mktemp("wide"), 2).rank_dirs


def assert_in_huge_page_memory(weights: dict[str, torch.Tensor], files: str) -> None:
    assert weights
    for name, weight in weights.items():
        where = mapping_of(weight.data_ptr())
        assert where is not None, name
        assert files not in where.path, f"{name} is a view of {where.path}"
        if huge_pages_supported():
            assert "hg" in where.flags, f"{name}: no huge pages advised ({sorted(where.flags)})"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_loaded_rank_holds_its_weights_in_huge_page_memory(wide_split, rank) -> None:
    group = InProcessGroup(2)
    model = load_rank(wide_split[rank], group.communicator(rank), max_seq_len=32)
    weights = {name: p for name, p in model.named_parameters()
               if p.numel() and name.endswith("proj.weight")}
    assert_in_huge_page_memory(weights, str(wide_split[rank]))
    layer_bytes = sum(w.numel() * w.element_size() for n, w in weights.items()
                      if n.startswith("layers.0."))
    assert layer_bytes > 2 * HUGE_PAGE, "the model is too small to test huge pages"
    assert all(w.data_ptr() % 64 == 0 for w in weights.values())
    assert torch.isfinite(next(iter(weights.values()))).all()


def test_a_whole_model_holds_its_weights_in_huge_page_memory(tiny_model_dir) -> None:
    """The single-process master's model (``load_model``) as a rank's."""
    model_dir, _ = tiny_model_dir("llama3", **WIDE)
    model = load_model(model_dir, max_seq_len=32)
    weights = {name: p for name, p in model.named_parameters()
               if p.numel() * p.element_size() >= HUGE_PAGE}
    assert_in_huge_page_memory(weights, str(model_dir))
