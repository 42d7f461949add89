"""Shared fixtures: deterministic seeds, few threads, and cached tiny Hugging Face models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory ``(family, seed=0, **overrides) -> (model_dir, hf_model)``, cached per session.

    The directory and the HF model are shared between tests: treat both as read-only (copy
    the directory, e.g. with ``hf_models.write_checkpoint``, before altering it).
    """
    from helpers.hf_models import make_hf_model

    cache: dict[str, tuple[Path, Any]] = {}

    def make(family: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
        key = json.dumps([family, seed, overrides], sort_keys=True, default=str)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"hf_{family}_{seed}")
            cache[key] = make_hf_model(root, family, seed=seed, **overrides)
        return cache[key]

    return make
