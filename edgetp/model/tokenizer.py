"""Master-side tokenizer for a Hugging Face model directory, matching ``transformers`` 5.

Reads ``tokenizer.json`` (required), ``tokenizer_config.json``, ``chat_template.jinja``,
``config.json`` and ``generation_config.json``. As in transformers 5, a ``tokenizer.json``
post-processor alone decides which special tokens ``encode`` adds (``add_bos_token`` is then
ignored, so BOS is never added twice); without one, ``add_bos_token``/``add_eos_token`` apply.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from edgetp.core.errors import ModelError
from edgetp.core.files import read_json
from edgetp.model.template_renderer import MAX_CHARS, RENDERER, RenderFailed
from edgetp.model.token_floor import TokenFloor

# The named special tokens transformers passes to chat templates (``special_tokens_map``).
SPECIAL_TOKEN_KEYS = tuple(f"{name}_token" for name in "bos eos unk sep pad cls mask".split())
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ModelError):
    """The tokenizer files are missing or unusable; the message says what to do."""


class ChatTemplateError(TokenizerError):
    """A chat template failed to render (including its own ``raise_exception`` calls, and
    renders that outgrow their memory, CPU time or output bounds)."""


class ChatTemplateTooLong(ChatTemplateError):
    """A chat template's output passed the characters allowed (``max_chars``)."""


def _read_json(path: Path) -> dict[str, Any]:
    """Return the JSON object in ``path``, ``{}`` if the file does not exist."""
    if not path.is_file():
        return {}
    data = read_json(path, "tokenizer file", TokenizerError)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token from a config: a string, a ``{"content": ...}`` dict, or None."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    """Token ids from a ``*_token_id`` config field (an int, a list of ints, or None)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _pick_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` if present (as transformers prefers it), else the config's.

    The config value is a string or a list of ``{"name", "template"}`` dicts (pick "default").
    """
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _register_added_tokens(tk: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
    """Add ``added_tokens_decoder`` entries and named special tokens missing from ``tk``."""
    decoder = config.get("added_tokens_decoder") or {}
    entries = [decoder[k] for k in sorted(decoder, key=int) if isinstance(decoder[k], dict)]
    named = (_token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS)
    entries += [{"content": t, "special": True, "normalized": False} for t in named if t]
    present = {t.content for t in tk.get_added_tokens_decoder().values()}
    new: dict[str, tokenizers.AddedToken] = {}
    for entry in entries:
        content = _token_text(entry)
        if content and content not in present and content not in new:
            flags = {k: bool(entry[k]) for k in _ADDED_TOKEN_FLAGS if k in entry}
            new[content] = tokenizers.AddedToken(content, **flags)
    tk.add_tokens(list(new.values()))


def _normalise_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages, dropping None values and aliasing reasoning fields, like transformers."""
    out = []
    for message in messages:
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token and chat-template settings of a model."""

    def __init__(
        self,
        tk: tokenizers.Tokenizer,
        config: dict[str, Any],
        chat_template: str | None = None,
        model_configs: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Wrap ``tk`` (registering config-declared added tokens it lacks); ``config`` is a
        parsed ``tokenizer_config.json`` (may be empty).

        ``model_configs`` (parsed config.json, generation_config.json) add EOS ids and supply the
        BOS id when ``config`` names no BOS token.
        """
        _register_added_tokens(tk, config)
        self._tk = tk
        self.chat_template = chat_template
        self.special_tokens = {
            k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k)))
        }
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        model_configs = list(model_configs)
        bos_ids = [self._token_id("bos_token")]
        bos_ids += [i for c in model_configs for i in _id_list(c.get("bos_token_id"))]
        eos_ids = [self._token_id("eos_token")]
        eos_ids += [i for c in model_configs for i in _id_list(c.get("eos_token_id"))]
        self._bos_id = next((i for i in bos_ids if i is not None), None)
        self._eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self._floor: TokenFloor | None = None  # made when first asked

    def _token_id(self, key: str) -> int | None:
        """Id of the named special token ``key`` (e.g. ``"bos_token"``), None if undefined."""
        token = self.special_tokens.get(key)
        return self._tk.token_to_id(token) if token else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model directory.

        Raises :class:`TokenizerError` if ``tokenizer.json`` is missing or a file is malformed.
        """
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{path} not found: edgetp needs a Hugging Face fast tokenizer. Pass the model "
                "directory that contains tokenizer.json, or create it with transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)."
            )
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizerError(f"cannot load {path}: {exc}") from exc
        config = _read_json(model_dir / "tokenizer_config.json")
        model_configs = [
            _read_json(model_dir / n) for n in ("config.json", "generation_config.json")
        ]
        return cls(tk, config, _pick_chat_template(model_dir, config), model_configs)

    @property
    def bos_token_id(self) -> int | None:
        """The BOS id (tokenizer_config ``bos_token``, else config.json ``bos_token_id``)."""
        return self._bos_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: tokenizer_config, config.json, generation_config.json."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Every token's text and id, added tokens included."""
        return dict(self._tk.get_vocab(with_added_tokens=True))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special added tokens plus the BOS and EOS ids."""
        added = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        bos = {self._bos_id} if self._bos_id is not None else set()
        return frozenset(added | bos | set(self._eos_ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS are added exactly as
        transformers does (by the tokenizer.json post-processor if there is one, else per
        ``add_bos_token``/``add_eos_token``). Special-token text in ``text`` maps to its id.
        Other threads run while it encodes."""
        # the batch call lets other threads run meanwhile (encode() holds the GIL throughout)
        encode_batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        ids = encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self._tk.post_processor is None:
            if self.add_bos_token and self._bos_id is not None:
                ids.insert(0, self._bos_id)
            if self.add_eos_token and self._eos_ids:
                ids.append(self._eos_ids[0])
        return ids

    def token_floor(self, text: str, enough: int) -> int:
        """At most as many tokens as ``text`` encodes to, found without encoding it (counting
        stops at ``enough``; special tokens are not counted): see :mod:`.token_floor`."""
        if self._floor is None:
            self._floor = TokenFloor.of_tokenizer(self._tk)
        return self._floor.of(text, enough)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special added tokens are dropped if ``skip_special_tokens``."""
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        max_chars: int = MAX_CHARS,
    ) -> str | list[int]:
        """Render ``messages`` with the model's chat template, as transformers does.

        The template runs in a sandboxed process with bounded memory and time
        (:mod:`edgetp.model.template_renderer`); its output may have at most ``max_chars``
        characters. Returns the text, or its ids if ``tokenize`` (encoded without adding
        BOS/EOS, since the template writes them). Raises :class:`TokenizerError` if the model
        has no template, :class:`ChatTemplateTooLong` for too long an output and
        :class:`ChatTemplateError` if rendering fails or the template calls
        ``raise_exception``.
        """
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template: pass a model whose tokenizer_config.json has "
                "`chat_template` (or that ships chat_template.jinja), or drop --chat."
            )
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation")
        try:
            text = RENDERER.render(self.chat_template, _normalise_messages(messages),
                                   add_generation_prompt, self.special_tokens, max_chars)
        except RenderFailed as exc:
            kind = ChatTemplateTooLong if exc.too_long else ChatTemplateError
            raise kind(str(exc)) from None
        return self.encode(text, add_special_tokens=False) if tokenize else text
