"""The splitter streams: its peak memory stays far below the checkpoint's size.

A ~470 MB float32 Llama checkpoint (hidden 1024, MLP 4096, 7 layers of 58 MB, vocab 8000) is
written tensor by tensor (never whole in memory), then split in a fresh subprocess that reports
its peak RSS (``VmHWM``) after importing torch and edgetp and again after splitting.

Bound: splitting may raise the peak by less than a quarter of the checkpoint's size (117 MB
here). The streaming splitter needs about one output file's tensors (one layer's slice, or the
embedding): ~60 MB measured for 1 and 2 nodes. Serialising each file in memory with
safetensors' ``save()`` (three copies of it) measured 178 MB for 1 node; holding the model
would be ~470 MB.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import processes

from edgetp.config.model import parse_hf_config
from edgetp.model.checkpoint import expected_tensor_names

MAX_INCREASE_FRACTION = 1 / 4
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8000,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 7,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

SPLIT_SCRIPT = r"""
import json, sys

def peak_rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

import torch
import edgetp.shard.split
from edgetp.shard.split import split_checkpoint

baseline = peak_rss()
result = split_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]))
print(json.dumps({"baseline": baseline, "peak": peak_rss(), "written": result.bytes_written}))
"""


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    cfg = parse_hf_config(config)
    d, hd, inner = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (cfg.vocab_size, d),
    }
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, d),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, d),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, d),
        "self_attn.o_proj.weight": (d, cfg.num_attention_heads * hd),
        "mlp.gate_proj.weight": (inner, d),
        "mlp.up_proj.weight": (inner, d),
        "mlp.down_proj.weight": (d, inner),
    }
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    assert sorted(shapes) == sorted(expected_tensor_names(cfg))
    return shapes


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Write a float32 safetensors file one tensor at a time; returns its size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {
            "dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    gen = torch.Generator().manual_seed(0)
    with path.open("wb") as handle:
        handle.write(len(blob).to_bytes(8, "little") + blob)
        for shape in shapes.values():
            tensor = torch.randn(shape, generator=gen) * 0.02
            handle.write(tensor.numpy().tobytes())
    return path.stat().st_size


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """(model_dir, size in bytes); the weights file is deleted after the module."""
    model_dir = tmp_path_factory.mktemp("big") / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    weights = model_dir / "model.safetensors"
    try:
        size = write_safetensors_streaming(weights, tensor_shapes(CONFIG))
        yield model_dir, size
    finally:
        weights.unlink(missing_ok=True)


@pytest.mark.parametrize("nodes", [1, 2])
def test_split_peak_memory_is_bounded(big_checkpoint, tmp_path, nodes):
    model_dir, size = big_checkpoint
    assert 400e6 < size < 600e6
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = processes.run(
            [sys.executable, "-c", SPLIT_SCRIPT, str(model_dir), str(out), str(nodes)],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    increase = report["peak"] - report["baseline"]
    print(
        f"\n{nodes} node(s): checkpoint {size / 2**20:.0f} MiB; splitter peak RSS "
        f"{report['peak'] / 2**20:.0f} MiB = baseline {report['baseline'] / 2**20:.0f} MiB "
        f"+ {increase / 2**20:.0f} MiB"
    )
    assert report["written"] > 0.95 * size
    assert increase < MAX_INCREASE_FRACTION * size, (
        f"splitting a {size / 2**20:.0f} MiB checkpoint for {nodes} node(s) raised the peak RSS "
        f"by {increase / 2**20:.0f} MiB (bound: {MAX_INCREASE_FRACTION * size / 2**20:.0f} MiB)"
    )
