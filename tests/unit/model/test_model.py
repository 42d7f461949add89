"""edgetp.model.llama against transformers (the oracle) on tiny random models of every family."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from helpers.hf_models import FAMILIES, VOCAB, write_checkpoint

from edgetp.config.model import RopeScaling, load_model_config
from edgetp.model.checkpoint import load_model
from edgetp.model.llama import rope_inv_freq

FAMILY_NAMES = list(FAMILIES)
PROMPT_LEN = 12
DECODE_STEPS = 32
ATOL = 1e-4


def prompt_tokens(n: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model(tokens[None]).logits[0].float()


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_prompt_logits_match_transformers(tiny_model_dir, family):
    path, hf = tiny_model_dir(family)
    model = load_model(path)
    tokens = prompt_tokens()
    ours = model(tokens, 0)
    ref = hf_logits(hf, tokens)
    assert ours.shape == (PROMPT_LEN, VOCAB) and ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{family}: max |logit diff| {diff:.3g}"


@torch.no_grad()
def hf_greedy(hf_model, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers' own KV cache: new tokens and each step's logits.

    A manual loop rather than ``generate``, which stops at (or, with ``min_new_tokens``,
    suppresses) the tiny models' EOS token.
    """
    # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field).
    params = inspect.signature(hf_model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    out = hf_model(prompt[None], use_cache=True)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    for _ in range(steps):
        step_logits = out.logits[0, -1].float()
        token = int(step_logits.argmax())
        tokens.append(token)
        logits.append(step_logits)
        out = hf_model(torch.tensor([[token]]), use_cache=True, **{key: getattr(out, key)})
    return tokens, logits


@torch.no_grad()
def hf_generate(hf_model, prompt: torch.Tensor, steps: int) -> list[int]:
    """transformers' greedy ``generate`` (it may stop early at EOS)."""
    out = hf_model.generate(
        prompt[None],
        attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
        do_sample=False,
        max_new_tokens=steps,
        pad_token_id=0,
    )
    return out[0, prompt.numel() :].tolist()


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_greedy_decode_with_kv_cache_matches_transformers(tiny_model_dir, family):
    path, hf = tiny_model_dir(family)
    model = load_model(path)
    prompt = prompt_tokens()
    ref_tokens, ref_logits = hf_greedy(hf, prompt, DECODE_STEPS)

    logits = model(prompt, 0)[-1]
    tokens: list[int] = []
    for step in range(DECODE_STEPS):
        diff = (logits - ref_logits[step]).abs().max().item()
        assert diff <= ATOL, f"{family}: step {step}: max |logit diff| {diff:.3g}"
        token = int(logits.argmax())
        tokens.append(token)
        ref = ref_logits[step]
        assert token == ref_tokens[step], (
            f"{family}: step {step}: we chose {token}, transformers {ref_tokens[step]} "
            f"(its logits {ref[token]:.6f} vs {ref[ref_tokens[step]]:.6f})"
        )
        logits = model(torch.tensor([token]), PROMPT_LEN + step)[0]
    generated = hf_generate(hf, prompt, DECODE_STEPS)
    assert generated == tokens[: len(generated)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("splits", [(5,), (4, 9)], ids=["2chunks", "3chunks"])
@torch.no_grad()
def test_chunked_prefill_matches_one_shot(tiny_model_dir, family, splits):
    path, _ = tiny_model_dir(family)
    model = load_model(path)
    tokens = prompt_tokens()
    one_shot = model(tokens, 0)
    bounds = [0, *splits, PROMPT_LEN]
    chunks = [model(tokens[a:b], a) for a, b in zip(bounds, bounds[1:], strict=False)]
    chunked = torch.cat(chunks)
    assert (chunked - one_shot).abs().max().item() <= 1e-5
    assert chunks[-1][-1].argmax() == one_shot[-1].argmax()
    # The cache now holds the chunked prefill: decoding on from it still agrees.
    nxt = torch.tensor([int(one_shot[-1].argmax())])
    after_chunks = model(nxt, PROMPT_LEN)
    model(tokens, 0)  # overwrite the cache with the one-shot prefill
    after_one_shot = model(nxt, PROMPT_LEN)
    assert (after_chunks - after_one_shot).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama3", "llama32", "qwen2", "head_dim", "sliding"])
@torch.no_grad()
def test_bfloat16_smoke(tiny_model_dir, family):
    path, _ = tiny_model_dir(family)
    model32 = load_model(path)
    model16 = load_model(path, dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    tokens = prompt_tokens(24, seed=3)
    ref = model32(tokens, 0)
    out = model16(tokens, 0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75, f"{family}: bf16 argmax agrees with fp32 on only {agree:.0%}"
    # Decoding a token in bf16 works too.
    step = model16(tokens[:1], 24)
    assert torch.isfinite(step).all()


@torch.no_grad()
def test_context_limit_raises_clear_value_error(tiny_model_dir):
    path, _ = tiny_model_dir("llama3")
    model = load_model(path, max_seq_len=16)
    assert model.max_seq_len == 16
    with pytest.raises(ValueError, match="17 tokens exceeds the context of 16"):
        model(prompt_tokens(17), 0)
    model(prompt_tokens(16), 0)  # exactly full is fine
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        model(torch.tensor([3]), 16)
    model(torch.tensor([3]), 15)
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        model(prompt_tokens(4), 14)
    # Default context: the config's max_position_embeddings.
    default = load_model(path)
    assert default.max_seq_len == load_model_config(path).max_position_embeddings


@pytest.mark.parametrize("family", ["llama31", "rope_linear", "llama3", "rms_eps"])
def test_rope_frequencies_match_transformers(tiny_model_dir, family):
    path, hf = tiny_model_dir(family)
    config = load_model_config(path)
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    ref = hf.model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    if family == "llama31":
        plain = rope_inv_freq(config.head_dim, config.rope_theta, RopeScaling())
        kept = torch.isclose(ours, plain)
        divided = torch.isclose(ours, plain / 8)
        smoothed = ~kept & ~divided
        # The fixture really exercises all three llama3 bands.
        assert kept.any() and divided.any() and smoothed.any()


@torch.no_grad()
def test_legacy_rope_config_keys_give_identical_logits(tiny_model_dir, tmp_path):
    """transformers <= 4.x wrote rope_theta + rope_scaling (with "type"); both must parse."""
    path, _ = tiny_model_dir("llama31")
    raw = json.loads((path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    theta = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    legacy = write_checkpoint(
        path, tmp_path / "legacy", config_updates={"rope_theta": theta, "rope_scaling": params}
    )
    config = json.loads((legacy / "config.json").read_text())
    config.pop("rope_parameters")
    (legacy / "config.json").write_text(json.dumps(config))
    assert load_model_config(legacy) == load_model_config(path)
    tokens = prompt_tokens()
    assert torch.equal(load_model(legacy)(tokens, 0), load_model(path)(tokens, 0))


@pytest.mark.parametrize("max_window_layers", [0, 1, 2])
@pytest.mark.parametrize("layer_types", [True, False], ids=["layer_types", "max_window_layers"])
@torch.no_grad()
def test_qwen2_sliding_window_respects_max_window_layers(
    tiny_model_dir, tmp_path, max_window_layers, layer_types
):
    """Qwen2 slides the window only on layers >= max_window_layers (regression).

    transformers 5 writes ``layer_types`` to config.json; older configs only have
    ``use_sliding_window`` + ``max_window_layers``, so both spellings are checked.
    """
    path, hf = tiny_model_dir(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=max_window_layers
    )
    if not layer_types:
        path = write_checkpoint(path, tmp_path / "no_layer_types")
        config = json.loads((path / "config.json").read_text())
        config.pop("layer_types", None)
        (path / "config.json").write_text(json.dumps(config))
    parsed = load_model_config(path)
    sliding = tuple(range(max_window_layers, 2))
    assert parsed.sliding_layers == sliding
    assert parsed.sliding_window == (4 if sliding else None)
    model = load_model(path)
    tokens = prompt_tokens()  # 12 tokens: three times the window
    ref = hf_logits(hf, tokens)
    diff = (model(tokens, 0) - ref).abs().max().item()
    assert diff <= ATOL, f"max_window_layers={max_window_layers}: max |logit diff| {diff:.3g}"
    # Token by token through the KV cache (the decode-time mask) agrees too.
    stepped = torch.cat([model(tokens[i : i + 1], i) for i in range(PROMPT_LEN)])
    diff = (stepped - ref).abs().max().item()
    assert diff <= ATOL, f"max_window_layers={max_window_layers}: decode |logit diff| {diff:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_matches_the_exact_softmax(dtype: torch.dtype) -> None:
    """Decode's grouped attention keeps SDPA's accuracy in bfloat16 too (scores of ~100 must
    not be rounded to bfloat16 before the softmax)."""
    from edgetp.config.model import ModelConfig
    from edgetp.model.llama import Attention

    config = ModelConfig(model_type="llama", vocab_size=8, hidden_size=256,
                         intermediate_size=8, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=128)
    attn = Attention(config)
    gen = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(1, 8, 128, generator=gen)).to(dtype)  # [1, H, hd]
    keys = (3 * torch.randn(2, 300, 128, generator=gen)).to(dtype)  # [KV, S, hd]
    values = torch.randn(2, 300, 128, generator=gen).to(dtype)
    got = attn._one_query(q, keys, values).view(2, 4, 128).double()  # [KV, G, hd]
    scores = q.double().view(2, 4, 128) @ keys.double().transpose(1, 2) / 128**0.5
    want = torch.softmax(scores, -1) @ values.double()  # [KV, G, hd]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bfloat16 output rounding
    assert float((got - want).abs().max()) < tolerance
