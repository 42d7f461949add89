"""Train the bundled known-answer demo model and save it in the Hugging Face layout.

The rule (see ``edgetp/demo.py``): ``count by K : A`` continues ``A+K A+2K ...`` up to 99,
then ends with ``</s>``. Anyone can check the output at a glance.

Run: ``python scripts/make_demo_model.py`` (a few minutes on a CPU); ``--draft`` trains the
small draft model shipped beside it (``edgetp/model/demo_draft``, for ``--draft``: the same rule
and tokenizer at hidden 48 and 2 layers, a few hundred KB).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from edgetp.config.model import parse_hf_config
from edgetp.model.demo import MAX_NUMBER, MAX_STEP, expected_continuation
from edgetp.model.llama import Transformer, apply_rope

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["count", "by", ":"]

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 12,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}
DRAFT_CONFIG = {  # the draft beside it (``--draft``): same rule and tokenizer, ~1/8 the size
    **HF_CONFIG,
    "hidden_size": 48,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 12,
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] | trim }}{% endif %}{% endfor %}"
)


def vocabulary() -> list[str]:
    return SPECIALS + WORDS + [str(n) for n in range(MAX_NUMBER + 1)]


def sequence_words(step: int, start: int) -> list[str]:
    numbers = [start] + expected_continuation(step, start)
    return ["<s>", "count", "by", str(step), ":"] + [str(n) for n in numbers] + ["</s>"]


def build_tokenizer() -> Tokenizer:
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def training_batch(batch: int, vocab: dict[str, int], rng: random.Random) -> torch.Tensor:
    """One step K for the whole batch, so rows have similar lengths and padding stays small."""
    step = rng.randint(1, MAX_STEP)
    rows = []
    for _ in range(batch):
        start = rng.randint(0, MAX_NUMBER - step)
        rows.append([vocab[w] for w in sequence_words(step, start)])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])  # [B, T]


def batched_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Training-time forward over a batch (no KV cache). tokens: [B, T] -> logits [B, T, V]."""
    b, t = tokens.shape
    cos, sin = model.rope_cos[:t], model.rope_sin[:t]
    h = model.embed_tokens(tokens)  # [B, T, d]
    for layer in model.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = apply_rope(attn.q_proj(x).view(b * t, attn.n_heads, -1), cos.repeat(b, 1),
                       sin.repeat(b, 1)).view(b, t, attn.n_heads, -1)
        k = apply_rope(attn.k_proj(x).view(b * t, attn.n_kv_heads, -1), cos.repeat(b, 1),
                       sin.repeat(b, 1)).view(b, t, attn.n_kv_heads, -1)
        v = attn.v_proj(x).view(b, t, attn.n_kv_heads, -1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=True,
        )  # [B, H, T, hd]
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.norm(h))


def train(steps: int, batch: int, seed: int, hf_config: dict = HF_CONFIG) -> Transformer:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab = {w: i for i, w in enumerate(vocabulary())}
    config = parse_hf_config({**hf_config, "vocab_size": len(vocab)})
    model = Transformer(config, max_seq_len=hf_config["max_position_embeddings"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    started = time.time()
    for step in range(steps):
        tokens = training_batch(batch, vocab, rng)
        logits = batched_forward(model, tokens[:, :-1])
        targets = tokens[:, 1:].clone()
        targets[:, :5] = 0  # "count by K : A" is the prompt, not a prediction target
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:6.1f}s")
    return model.eval()


def save(model: Transformer, out: Path, hf_config: dict = HF_CONFIG) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        (name if name.startswith("lm_head") else f"model.{name}"): p.detach().contiguous()
        for name, p in model.named_parameters()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {**hf_config, "vocab_size": len(vocabulary())}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer().save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": HF_CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation_config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def check(model: Transformer) -> float:
    """Fraction of all (step, start) prompts whose greedy continuation follows the rule."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    cases = [(k, a) for k in range(1, MAX_STEP + 1) for a in range(0, MAX_NUMBER - k + 1)]
    with torch.no_grad():
        rows = [[vocab[w] for w in sequence_words(k, a)] for k, a in cases]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        predicted = batched_forward(model, tokens).argmax(-1)  # [N, T]
    correct = 0
    for i, row in enumerate(rows):
        targets = torch.tensor(row[6:])  # everything after "<s> count by K : A"
        correct += bool(torch.equal(predicted[i, 5 : len(row) - 1], targets))
    return correct / len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: edgetp/model/demo_model (with --draft: demo_draft)")
    parser.add_argument("--draft", action="store_true",
                        help="train the small draft model (same rule and tokenizer)")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    hf_config = DRAFT_CONFIG if args.draft else HF_CONFIG
    out = args.out or Path("edgetp/model/demo_draft" if args.draft else "edgetp/model/demo_model")
    model = train(args.steps, args.batch, args.seed, hf_config)
    accuracy = check(model)
    print(f"rule followed (teacher-forced) on {accuracy:.1%} of all prompts")
    save(model, out, hf_config)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
