"""The fewest tokens a text can encode to, found without encoding it: :class:`TokenFloor`.

Encoding megabytes of text takes seconds, so the API server refuses a prompt that cannot fit
the context before it encodes it. The floor must never be above the true count (a prompt that
fits would be refused), so it only uses what the tokenizer's own description guarantees,
after its normalizer (which may shorten the text) has run:

* when every character is covered by vocabulary tokens (a byte-level BPE, or byte fallback in
  BPE or Unigram), one token stands for at most ``longest`` characters (the longest vocabulary
  or added token): at least ``ceil(characters / longest)`` tokens, whitespace left out when
  the pre-tokenizer or an added token may drop it;
* when the pre-tokenizer splits at whitespace and every word gives a token (an unknown word
  gives the unknown token: WordLevel, WordPiece, Unigram, BPE with an unknown token), at least
  one token per run of non-whitespace characters;
* otherwise nothing is known: the floor is 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import tokenizers

# Unicode White_Space, which the tokenizers library (Rust's char::is_whitespace) splits at.
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) \
    + "\u2028\u2029\u202f\u205f\u3000"
WORD = re.compile(f"[^{re.escape(WHITE_SPACE)}]+")
# Python's whitespace: White_Space and \x1c-\x1f; leaving out more than is dropped is safe.
PYTHON_SPACE = WHITE_SPACE + "\x1c\x1d\x1e\x1f"
KEEPS_TEXT = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}  # pre-tokenizers
SPLITS_AT_SPACE = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"}  # and drop it


@dataclass(frozen=True)
class TokenFloor:
    """What a tokenizer guarantees (see the module); :meth:`of` bounds a text's token count."""

    normalizer: Any  # tokenizers' normalizer, or None
    longest: int | None  # characters one token stands for at most; None: unbounded
    drops_space: bool  # whitespace may vanish (pre-tokenizer, stripping added tokens)
    word_tokens: bool  # each run of non-whitespace gives at least one token

    @classmethod
    def of_tokenizer(cls, tk: tokenizers.Tokenizer) -> TokenFloor:
        spec = json.loads(tk.to_str())
        model, added = spec.get("model") or {}, spec.get("added_tokens") or []
        pre = _pre_tokenizers(spec.get("pre_tokenizer"))
        keeps = all(p.get("type") in KEEPS_TEXT or _isolates(p) for p in pre)
        known = all(p.get("type") in KEEPS_TEXT | SPLITS_AT_SPACE or _isolates(p) for p in pre)
        splits = any(p.get("type") in SPLITS_AT_SPACE or _metaspace_split(p) for p in pre)
        vocab = _vocabulary(model)
        covered = known and _covers_every_byte(model, pre, set(vocab))
        contents = [str(t.get("content", "")) for t in added]
        longest = None
        if covered:
            normal = tk.normalizer
            texts = vocab + contents + [normal.normalize_str(c) for c in contents if normal]
            longest = max((len(t) for t in texts), default=1) or 1
        kind = model.get("type")
        word_unknown = kind in ("WordLevel", "WordPiece", "Unigram") or (
            kind == "BPE" and (model.get("unk_token") is not None or covered))
        spaced = any(WORD.fullmatch(c) is None for c in contents if c)  # "a b" is one token
        stripping = any(t.get("lstrip") or t.get("rstrip") for t in added)
        return cls(tk.normalizer, longest, stripping or not keeps,
                   splits and known and word_unknown and not spaced)

    def of(self, text: str, enough: int) -> int:
        """At most the number of tokens ``text`` encodes to (special tokens not counted).

        Counting stops once the floor reaches ``enough``, and below ``enough`` the floor may be
        less than it could be (whitespace is only counted when that can reach ``enough``).
        """
        if self.longest is None and not self.word_tokens:
            return 0
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        floor = 0
        if self.longest is not None and -(-len(text) // self.longest) >= enough:
            chars = len(text)
            if self.drops_space:
                chars -= sum(text.count(space) for space in PYTHON_SPACE)
            floor = -(-chars // self.longest)
        if self.word_tokens and floor < enough:
            words = 0
            for words, _ in enumerate(WORD.finditer(text), start=1):  # noqa: B007
                if words >= enough:
                    break
            floor = max(floor, words)
        return floor


def _pre_tokenizers(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [p for inner in spec.get("pretokenizers", []) for p in _pre_tokenizers(inner)]
    return [spec]


def _metaspace_split(spec: dict[str, Any]) -> bool:
    """Metaspace that splits: each word (with the space before it, as ``▁``) a piece."""
    return spec.get("type") == "Metaspace" and bool(spec.get("split", True))


def _isolates(spec: dict[str, Any]) -> bool:
    """A splitting pre-tokenizer that keeps what it splits at (behaviour other than removed)."""
    return spec.get("type") in ("Split", "Punctuation") and \
        str(spec.get("behavior", "Isolated")).lower() != "removed"


def _covers_every_byte(model: dict[str, Any], pre: list[dict[str, Any]], vocab: set[str]
                       ) -> bool:
    """Whether any text is encoded with vocabulary tokens only (never an unknown token, which
    may stand for a whole run of unknown characters): byte-level BPE with the whole byte
    alphabet, or BPE/Unigram with byte fallback and every ``<0xNN>`` token."""
    if model.get("type") not in ("BPE", "Unigram"):
        return False
    if any(p.get("type") == "ByteLevel" for p in pre):
        return set(tokenizers.pre_tokenizers.ByteLevel.alphabet()) <= vocab
    return bool(model.get("byte_fallback")) and {f"<0x{b:02X}>" for b in range(256)} <= vocab


def _vocabulary(model: dict[str, Any]) -> list[str]:
    vocab = model.get("vocab") or {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        return list(vocab)
    return [str(entry[0]) for entry in vocab if entry]  # Unigram: [token, score] pairs
