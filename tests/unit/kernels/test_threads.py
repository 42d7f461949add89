"""A node's thread setting (edgetp.kernels.threads): torch and the native products together,
and a machine's cores divided among the nodes of a local cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from edgetp.kernels import native
from edgetp.kernels.threads import (
    local_cluster_threads,
    node_threads,
    step_threads,
    use_threads,
)


@pytest.fixture(autouse=True)
def one_thread_after() -> Iterator[None]:
    yield
    use_threads(1)  # as the test session runs


def test_use_threads_sets_torch_and_the_products_alike() -> None:
    assert use_threads(3) == 3 == node_threads()
    assert torch.get_num_threads() == 3
    assert native.threads() == (3 if native.available() else 1)
    assert use_threads(None) == native.usable_cores() == torch.get_num_threads()
    with pytest.raises(ValueError, match=">= 1"):
        use_threads(0)


def test_torch_computes_a_one_token_step_on_one_thread_and_prefill_on_the_nodes() -> None:
    use_threads(3)
    step_threads(1)
    assert torch.get_num_threads() == 1 and native.threads() == (3 if native.available() else 1)
    step_threads(128)
    assert torch.get_num_threads() == 3


def test_the_model_sets_torch_threads_for_each_step() -> None:
    from edgetp.model.checkpoint import load_model
    from edgetp.model.demo import DEMO_MODEL_DIR

    model = load_model(DEMO_MODEL_DIR)
    use_threads(2)
    model(torch.tensor([1, 2, 3]))  # prefill: 3 tokens
    assert torch.get_num_threads() == 2
    model(torch.tensor([4]), start_pos=3)  # decode: one token
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(("cores", "nodes", "shares"), [
    (2, 1, [2]), (2, 2, [1, 1]), (8, 3, [4, 2, 2]), (16, 4, [4, 4, 4, 4]), (4, 3, [2, 1, 1]),
    (2, 3, [1, 1, 1]),  # more nodes than cores: one each is the least there is
])
def test_a_local_cluster_divides_the_cores(cores: int, nodes: int, shares: list[int]) -> None:
    assert local_cluster_threads(cores, nodes) == shares
    assert sum(shares) <= max(cores, nodes)


def test_a_cluster_has_nodes() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        local_cluster_threads(4, 0)
