"""Logits are float32 in every mode, never rounded to bfloat16: one device in float32 and in
bfloat16, and 2 ranks of float32, bfloat16, int8 and int4 splits (with the int4 split's default
int8 head and with an int4 head) computed in float32 and in bfloat16. Rounded logits would tie
the top tokens (near 16-20 a bfloat16 step is 0.06-0.125), so each mode's logits must be
float32 tensors whose values are mostly off the bfloat16 grid.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.hf_models import VOCAB
from helpers.parallel import RankContext, run_sharded

from edgetp.model.checkpoint import load_model
from edgetp.model.llama import Transformer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.loader import load_rank
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 32
PROMPT = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(11)).tolist()


def off_the_bfloat16_grid(logits: torch.Tensor) -> float:
    """The fraction of values that bfloat16 cannot hold exactly."""
    return float((logits.bfloat16().float() != logits).float().mean())


def decode_logits(models: list[Transformer]) -> list[torch.Tensor]:
    """Greedy decoding of 4 steps after the prompt; the logits of every step (rank 0's)."""
    def work(model: Transformer, ctx: RankContext) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        current, pos = torch.tensor(PROMPT), 0
        for _ in range(4):
            h = ctx.broadcast(model.embed(current) if ctx.rank == 0 else None)
            h = model.forward_layers(h, pos, range(model.config.num_hidden_layers))
            token = None
            if ctx.rank == 0:
                out.append(model.head(h[-1:])[0])
                token = int(out[-1].argmax())
            pos += current.numel()
            current = torch.tensor([ctx.broadcast(token)])
        return out

    return run_sharded(models, len(models), work)


def check_float32(logits: list[torch.Tensor]) -> None:
    for step in logits:
        assert step.dtype == torch.float32 and step.shape == (VOCAB,)
        assert off_the_bfloat16_grid(step) > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_device_gives_float32_logits(tiny_model_dir, dtype: torch.dtype) -> None:
    model_dir, _ = tiny_model_dir("llama32")
    model = load_model(model_dir, dtype, MAX_SEQ_LEN)
    with torch.inference_mode():
        prefill = model(torch.tensor(PROMPT))  # [T, V]: every row of a prompt
        check_float32(list(prefill))
        check_float32(decode_logits([model]))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-kernels"])
@pytest.mark.parametrize(("split", "head", "compute"), [
    ("float32", None, torch.float32),
    ("bfloat16", None, torch.bfloat16),
    ("int8", None, torch.float32),
    ("int8", None, torch.bfloat16),
    ("int4", None, torch.float32),
    ("int4", "int4", torch.float32),
    ("int4", "int4", torch.bfloat16),
])
def test_every_split_gives_float32_logits(tiny_model_dir, tmp_path: Path, monkeypatch,
                                          split: str, head: str | None, compute: torch.dtype,
                                          native: bool) -> None:
    """``native``: with the C kernels, else without them (torch's int8/int4 kernels round
    their output to bfloat16: the head must not use them)."""
    if not native:
        monkeypatch.setattr("edgetp.kernels.native.library", lambda: None)
    model_dir, _ = tiny_model_dir("llama3")
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype=split, head_dtype=head).rank_dirs
    group = InProcessGroup(2)
    models = [load_rank(d, group.communicator(r), compute, MAX_SEQ_LEN)
              for r, d in enumerate(dirs)]
    with torch.inference_mode():
        check_float32(decode_logits(models))
