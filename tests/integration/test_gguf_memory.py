"""The GGUF converter streams: its peak memory stays at a few row chunks, below the size of the
largest tensor it converts.

A Q8_0 Llama GGUF of ~90 MB whose embedding alone is 131 MB once dequantized to float32 (vocab
8000, hidden 4096, tied head, 1 layer; ~330 MB converted) is converted in a fresh subprocess
that reports its peak RSS (``VmHWM``) after importing torch and edgetp and again after
converting. Bound: the increase stays under :data:`MAX_INCREASE` (100 MB, below that one
tensor); ~76 MB measured: the GGUF reader's metadata objects and the tokenizer (~40 MB, growing
with the vocabulary, not the weights), then a 8 MiB chunk's dequantization temporaries.
Holding the embedding whole would take 131 MB on top; holding the model, 330 MB.
"""

from __future__ import annotations

import json
import os
import sys

import gguf
import numpy as np
import pytest
from helpers import processes
from helpers.gguf_files import byte_level_vocab

MAX_INCREASE = 100 << 20
HIDDEN, MLP, LAYERS, VOCAB, KV = 4096, 1024, 1, 8000, 512

CONVERT_SCRIPT = r"""
import json, sys
import torch
from edgetp.model.gguf import convert_gguf

def high_water():  # VmHWM: this process's peak RSS (ru_maxrss would count the parent's too)
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmHWM"].split()[0]) * 1024

baseline = high_water()
convert_gguf(sys.argv[1], sys.argv[2])
print(json.dumps({"baseline": baseline, "peak": high_water()}))
"""


def write_big_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(16)
    writer.add_head_count_kv(4)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens, types, merges, _ = byte_level_vocab(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        for part, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (KV, HIDDEN)),
                            ("attn_v", (KV, HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
                            ("ffn_gate", (MLP, HIDDEN)), ("ffn_up", (MLP, HIDDEN)),
                            ("ffn_down", (HIDDEN, MLP))):
            shapes[f"blk.{layer}.{part}.weight"] = shape
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for name, shape in shapes.items():
        values = rng.standard_normal(shape, dtype=np.float32) * 0.02
        raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_conversion_peak_memory_stays_below_one_tensor(tmp_path):
    path = tmp_path / "big.gguf"
    write_big_gguf(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = processes.run([sys.executable, "-c", CONVERT_SCRIPT, str(path), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    increase = report["peak"] - report["baseline"]
    print(f"converted {written / 1e6:.0f} MB with a peak increase of {increase / 1e6:.0f} MB")
    assert written > 200e6 and VOCAB * HIDDEN * 4 > MAX_INCREASE
    assert increase < MAX_INCREASE
