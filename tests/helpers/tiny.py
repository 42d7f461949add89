"""Tiny in-process stand-ins shared by the unit tests: a random 2-layer Llama and a codec
whose tokens are byte strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgetp.model.llama import Transformer

EOS = 0  # ByteCodec's end of sequence


class ByteCodec:
    """Token i decodes to ``pieces[i]`` (bytes; partial UTF-8 decodes to U+FFFD); EOS to ""."""

    def __init__(self, pieces: Sequence[bytes | str]) -> None:
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        eos = b"" if skip_special_tokens else b"<eos>"
        data = b"".join(eos if i == EOS else self.pieces[i] for i in ids)
        return data.decode("utf-8", errors="replace")


def codec_for(*pieces: bytes | str) -> ByteCodec:
    """A codec whose token 1.. are ``pieces`` (token 0 is EOS)."""
    return ByteCodec([b"", *pieces])


def tiny_model(seed: int) -> Transformer:
    """A random 2-layer Llama (hidden 32, 4 heads over 2 KV heads, vocabulary 40, context 64),
    its cache allocated."""
    from edgetp.config.model import parse_hf_config

    torch.manual_seed(seed)
    config = parse_hf_config({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "vocab_size": 40,
                              "max_position_embeddings": 64})
    model = Transformer(config, max_seq_len=64)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.allocate_cache()
    return model.eval()
