"""A GGUF file's tokenizer as ``tokenizer.json`` and ``tokenizer_config.json``.

Built with the ``tokenizers`` library from the vocabulary llama.cpp stores:

``tokenizer.ggml.model = gpt2``
    byte-level BPE: the tokens (already in the byte alphabet) and the merges. How text is cut
    into words before the merges depends on ``tokenizer.ggml.pre`` (:data:`PRE_TOKENIZERS`,
    the same expressions llama.cpp applies): GPT-2's, SmolLM/StarCoder's (every digit its own
    word first), Llama 3's, Qwen2's.
``tokenizer.ggml.model = llama``
    SentencePiece BPE: tokens and scores, byte fallback (``<0x41>``), ``▁`` for spaces with one
    prepended to the text when ``tokenizer.ggml.add_space_prefix`` says so (the default). The
    file has no merges: every split of a token into two tokens is a merge, ranked by the
    merged token's score (SentencePiece merges the best-scoring pair first).

Tokens of type CONTROL become added special tokens, USER_DEFINED ones added plain tokens, so
they are matched whole. BOS/EOS are added as ``tokenizer.ggml.add_bos_token`` (default: on for
SentencePiece, off for byte-level BPE, as llama.cpp) and ``add_eos_token`` say.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from edgetp.model.gguf.reader import GGUFError, GGUFFile

CONTROL, USER_DEFINED = 3, 4
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = ("gpt2",)
_DIGITS_THEN_GPT2 = ("digits",)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"),
                    ("split", _LLAMA3_WORDS)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"),
                    ("split", _QWEN2_WORDS)),
}


def tokenizer_files(file: GGUFFile) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """``(tokenizer, tokenizer_config)`` for the vocabulary in ``file``."""
    kind = file.value("tokenizer.ggml.model")
    tokens: list[str] = file.value("tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFError(f"{file.path} has no vocabulary (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        tk = _byte_level(file, tokens)
        add_bos = bool(file.value("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        tk = _sentencepiece(file, tokens)
        add_bos = bool(file.value("tokenizer.ggml.add_bos_token", True))
    else:
        raise GGUFError(f"{file.path} has a {kind!r} tokenizer, which edgetp does not convert",
                        "supported: gpt2 (byte-level BPE) and llama (SentencePiece)")
    add_eos = bool(file.value("tokenizer.ggml.add_eos_token", False))
    _add_special_tokens(tk, tokens, file.value("tokenizer.ggml.token_type") or [])
    names = _special_names(file, tokens)
    tk.post_processor = _post_processor(file, tokens, add_bos, add_eos)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(file.arch_value("context_length", 2048)),
        **names,
    }
    if (template := file.value("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return tk, config


def _byte_level(file: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in file.value("tokenizer.ggml.merges") or []]
    tk = tokenizers.Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, fuse_unk=False))
    pre = file.value("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{file.path}: the pre-tokenizer {pre!r} is not supported",
                        f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    spec = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec[0] != "split")
    if spec[0] == "split":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(spec[1]), behavior="isolated"), byte_level])
    elif spec == _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece(file: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    scores: list[float] = file.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = _vocab(tokens)
    unk = file.value("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab=vocab, merges=_merges_by_score(vocab, scores),
                       unk_token=tokens[unk] if unk is not None else None,
                       fuse_unk=True, byte_fallback=True)
    tk = tokenizers.Tokenizer(model)
    prefix = bool(file.value("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a token listed twice keeps its first id (the later one is never produced)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _merges_by_score(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a token, best merged score first."""
    ranked = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tk: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind == CONTROL]
    plain = [AddedToken(tokens[i], special=False, normalized=False)
             for i, kind in enumerate(types) if kind == USER_DEFINED]
    tk.add_special_tokens(special)
    tk.add_tokens(plain)


def _special_names(file: GGUFFile, tokens: list[str]) -> dict[str, str]:
    names = {}
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                      ("unknown_token_id", "unk_token"), ("padding_token_id", "pad_token")):
        index = file.value(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= index < len(tokens):
            names[name] = tokens[index]
    return names


def _post_processor(file: GGUFFile, tokens: list[str], add_bos: bool, add_eos: bool,
                    ) -> processors.PostProcessor | None:
    """BOS/EOS around each sequence as the file asks; None when it asks for neither."""
    ends = []
    for key, wanted in (("bos_token_id", add_bos), ("eos_token_id", add_eos)):
        index = file.value(f"tokenizer.ggml.{key}")
        if wanted and index is not None:
            ends.append((tokens[index], int(index)))
    if not ends:
        return None
    bos = [text for text, index in ends[:1] if add_bos]
    eos = [text for text, index in ends[-1:] if add_eos]
    single = [*bos, "$A", *eos]
    pair = [*single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=ends)
