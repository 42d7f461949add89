"""The token floor (``edgetp.model.token_floor``): never above the true count, useful on big texts.

For tokenizers of every kind the API may meet (byte-level BPE as Llama 3, byte-fallback BPE as
Llama 2, the demo's WordLevel, a BERT-like WordPiece, a Unigram, and one whose pre-tokenizer
removes what it splits at), the floor of random texts (whitespace of every kind, control and
combining characters, emoji, special tokens in the text) is at most the number of tokens the
text encodes to; and a megabyte of text gets a floor near its true count, quickly.
"""

from __future__ import annotations

import random
import time

import pytest
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer

from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.model.token_floor import TokenFloor

CORPUS = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.",
          "café naïve résumé 日本語 🙂", "count by 3 : 5 8 11 14"] * 8
SPECIAL = "<|eot_id|>"
PIECES = ["a", "b", "the", "fox", " ", "  ", "\t", "\n", "\x1c", "\x85", "\u3000", "\u00a0",
          "é", "e\u0301", "日本", "🙂", ".", ",", "count", "3", "ﬁ", SPECIAL, "\x00", "\u200b"]


def byte_level_bpe() -> RawTokenizer:
    tk = RawTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[SPECIAL], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def byte_fallback_bpe() -> RawTokenizer:
    vocab = {"<unk>": 0, "<s>": 1}
    vocab.update({f"<0x{b:02X}>": 2 + b for b in range(256)})
    for piece in ["▁", "▁the", "▁fox", *"abcdefghijklmnopqrstuvwxyz.,"]:
        vocab[piece] = len(vocab)
    tk = RawTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True,
                                 fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                          normalizers.Replace(" ", "▁")])
    tk.add_special_tokens([AddedToken(SPECIAL, normalized=False)])
    return tk


def word_piece() -> RawTokenizer:
    tk = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", SPECIAL], show_progress=False))
    tk.add_special_tokens([AddedToken(SPECIAL, lstrip=True, rstrip=True)])
    return tk


def unigram() -> RawTokenizer:
    tk = RawTokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<unk>", SPECIAL], unk_token="<unk>",
        show_progress=False))
    return tk


def removing_split() -> RawTokenizer:
    tk = byte_level_bpe()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[a-z]"), behavior="removed")
    return tk


TOKENIZERS = {
    "byte_level_bpe": byte_level_bpe,
    "byte_fallback_bpe": byte_fallback_bpe,
    "demo_word_level": lambda: RawTokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json")),
    "word_piece": word_piece,
    "unigram": unigram,
    "removing_split": removing_split,
}


def count(tk: RawTokenizer, text: str) -> int:
    return len(tk.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_the_floor_is_never_above_the_count(name: str) -> None:
    tk = TOKENIZERS[name]()
    floor = TokenFloor.of_tokenizer(tk)
    rng = random.Random(name)
    for _ in range(400):
        text = "".join(rng.choice(PIECES) * rng.choice([1, 1, 2, 40]) for _ in range(30))
        true = count(tk, text)
        assert floor.of(text, 10**9) <= true, (text, floor)
        assert floor.of(text, 1) <= true and floor.of(text, 3) <= true  # chars counted


@pytest.mark.parametrize("name", sorted(set(TOKENIZERS) - {"removing_split"}))
def test_a_megabyte_is_found_over_a_context_quickly(name: str) -> None:
    tk = TOKENIZERS[name]()
    floor = TokenFloor.of_tokenizer(tk)
    text = ("count by 3 : 5 8 11 the fox " * 40_000)[: 1 << 20]
    context = 32768
    assert count(tk, text) > 5 * context
    started = time.monotonic()
    assert floor.of(text, context) >= context
    assert time.monotonic() - started < 2.0


def test_nothing_is_known_of_a_pre_tokenizer_that_removes_text() -> None:
    floor = TokenFloor.of_tokenizer(removing_split())
    assert floor.longest is None and not floor.word_tokens
    assert floor.of("hello " * 1000, 10**9) == 0
