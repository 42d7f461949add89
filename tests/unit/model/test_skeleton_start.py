"""A node's skeleton (the model built on the meta device before its weights load) is cheap to
build: nothing in it imports torch._dynamo (2 s of CPU at every node's start, eight nodes on
two cores for the 70B benchmark); a model built on a real device still starts random."""

from __future__ import annotations

import subprocess
import sys

import torch

from edgetp.config.model import parse_hf_config
from edgetp.model.llama import Transformer
from edgetp.model.synthetic import llama_config

CONFIG = llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300)
SKELETON = f"""
import sys, torch
from edgetp.config.model import parse_hf_config
from edgetp.model.llama import Transformer
with torch.device("meta"):
    model = Transformer(parse_hf_config({CONFIG!r}))
assert model.embed_tokens.weight.is_meta
print("torch._dynamo" in sys.modules)
"""


def test_a_skeleton_imports_no_dynamo() -> None:
    done = subprocess.run([sys.executable, "-c", SKELETON], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_real_model_starts_random() -> None:
    weight = Transformer(parse_hf_config(CONFIG)).embed_tokens.weight  # [300, 64]
    assert 0.5 < float(weight.std()) < 2 and torch.isfinite(weight).all()
