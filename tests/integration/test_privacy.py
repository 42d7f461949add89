"""Workers see hidden states and control headers only: every frame they receive is checked.

Real worker processes record every message they receive (``--capture-frames``) during a full
generation (prefill and decode) with sampling settings in force; the test then decodes every
frame and checks that none carries token ids, text, logits or sampling parameters, and, with
``private_layers``, that workers never see embedding rows or final hidden states.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import torch

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.checkpoint import load_model
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt
from edgetp.net import wire
from edgetp.runtime.local import LocalCluster
from edgetp.runtime.master import Prompt

PROMPT = demo_prompt(7, 2)
SAMPLING = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1,
                          seed=4242)
ALLOWED_OPS = {"welcome", "step", "sum", "abort", "shutdown", "pong", "rejoin", "collect",
               "link", "partial"}  # partial: the master's own, in a two-node exchange


def captured_messages(path: Path) -> list[list[bytes]]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(path.read_bytes())
    return list(unpacker)


def run_and_capture(tmp_path: Path, private_layers: int, nodes: int = 3):
    capture = tmp_path / "frames"
    capture.mkdir(parents=True)
    cluster = LocalCluster(DEMO_MODEL_DIR, nodes, private_layers=private_layers, timeout_s=5.0,
                           split_dir=tmp_path / "split", capture_dir=capture)
    with cluster as master:
        result = master.generate(Prompt(PROMPT), SAMPLING, GenerationConfig(max_new_tokens=12))
        prompt_ids = master.encode_prompt(Prompt(PROMPT))
    messages = {rank: captured_messages(capture / f"rank-{rank}.frames")
                for rank in range(1, nodes)}
    return result, prompt_ids, messages


def tensors_of(messages: list[list[bytes]], op: str) -> list[torch.Tensor]:
    out = []
    for frames in messages:
        message = wire.decode(frames)
        if message.op == op:
            out.extend(t.float() for t in message.tensors)
    return out


def check_frames_carry_no_private_data(messages, result, prompt_ids, hidden, vocab) -> None:
    sensitive = [PROMPT.encode(), result.text.encode()] + [
        str(v).encode() for v in (SAMPLING.temperature, SAMPLING.top_p, SAMPLING.seed)
    ]
    for frames in messages:
        message = wire.decode(frames)  # every frame a worker got is a valid protocol message
        assert message.op in ALLOWED_OPS
        assert set(message.fields) <= {"seq", "step", "slots", "starts", "index", "session",
                                       "wire_dtype", "time", "echo", "allreduce", "ring_port",
                                       "ring_keys", "address", "data", "data_key",
                                       "data_cipher"}  # ring_keys, data_key: public keys
        for tensor in message.tensors:
            assert tensor.dtype in (torch.float32, torch.bfloat16)  # never integer ids
            assert tensor.dim() == 2 and tensor.shape[1] == hidden != vocab  # never logits
        blob = b"".join(frames)
        for needle in sensitive:
            assert needle not in blob
        header = msgpack.unpackb(frames[0], raw=False)
        assert not any(isinstance(v, list) and v and all(isinstance(i, int) for i in v)
                       and v[: len(prompt_ids)] == prompt_ids for v in header.values())


@pytest.fixture(scope="module")
def reference():
    return load_model(DEMO_MODEL_DIR)


@pytest.mark.parametrize(("private_layers", "nodes"), [(0, 3), (1, 3), (0, 2)])
def test_worker_frames_hold_no_tokens_text_logits_or_sampling(
    tmp_path: Path, reference, private_layers: int, nodes: int
) -> None:
    """Three nodes: the workers get steps and sums; two: the master's partials instead of the
    sums (the exchange), hidden-state-sized like them."""
    result, prompt_ids, messages = run_and_capture(tmp_path, private_layers, nodes)
    config = reference.config
    for rank_messages in messages.values():
        ops = [wire.decode(f).op for f in rank_messages]
        assert ops.count("step") == len(result.token_ids)  # prefill + one per decoded token
        assert ("partial" in ops, "sum" in ops) == ((True, False) if nodes == 2 else
                                                    (False, True))
        check_frames_carry_no_private_data(rank_messages, result, prompt_ids,
                                           config.hidden_size, config.vocab_size)


def nearest_distance(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row [N, d], the distance to the closest row of table [M, d]."""
    distances = torch.cdist(rows, table, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.min(dim=1).values


def test_plain_mode_exposes_embeddings_and_private_layers_hide_them(
    tmp_path: Path, reference
) -> None:
    """The documented weakness of plain mode, and what --private-layers 1 changes."""
    embedding = reference.embed_tokens.weight.float()  # [V, d]
    _, _, plain = run_and_capture(tmp_path / "plain", 0)
    plain_steps = torch.cat(tensors_of(plain[1], "step"))
    assert nearest_distance(plain_steps, embedding).max() < 1e-6  # rows ARE embedding rows

    result, prompt_ids, private = run_and_capture(tmp_path / "private", 1)
    private_rows = torch.cat(tensors_of(private[1], "step") + tensors_of(private[1], "sum"))
    scale = embedding.norm(dim=1).mean()
    assert nearest_distance(private_rows, embedding).min() > 0.05 * scale

    tokens = torch.tensor(prompt_ids + result.token_ids[:-1])
    with torch.inference_mode():
        final = reference.forward_layers(reference.embed(tokens), 0)  # [T, d]
    assert nearest_distance(final, private_rows).min() > 0.05 * final.norm(dim=1).mean()
