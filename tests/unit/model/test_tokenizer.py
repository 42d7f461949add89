"""Tests for ``edgetp.model.tokenizer``: tokenizers built in tmp dirs, checked against
transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as RawTokenizer

from edgetp.model.tokenizer import ChatTemplateError, Tokenizer, TokenizerError
from edgetp.runtime.engine import TextStream

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIALS = [BOS, EOS, HEADER_START, HEADER_END, EOT]
CORPUS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "Tensor parallel inference runs on a cluster of home devices.",
    "You are a helpful assistant. What is the capital of France? Paris.",
    "café naïve résumé",
] * 4
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?  "},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? <b>é</b> 🙂"},
]
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "The quick brown fox\njumps\tover the lazy dog.",
    "café naïve résumé",
    "emoji 🙂🚀 and 日本語",
    f"{BOS}special{EOT} tokens in text",
    "",
]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _byte_level_bpe(post_processor: bool) -> RawTokenizer:
    """A Llama-3-style byte-level BPE; optionally with a TemplateProcessing that adds BOS."""
    tk = RawTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    if post_processor:
        bos = (BOS, tk.token_to_id(BOS))
        tk.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos]
                ),
            ]
        )
    return tk


def _byte_fallback_bpe() -> RawTokenizer:
    """A Llama-2-style sentencepiece BPE (``▁`` spaces, byte fallback) without merges."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?":
        vocab[ch] = len(vocab)
    tk = RawTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tk


def make_model_dir(
    path: Path,
    *,
    post_processor: bool = True,
    config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    gen_config: dict[str, Any] | None = None,
) -> Path:
    """Write a Llama-3-style tokenizer directory; ``config`` entries override tokenizer_config."""
    path.mkdir(parents=True, exist_ok=True)
    _byte_level_bpe(post_processor).save(str(path / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    tok_config.update(config or {})
    _write_json(
        path / "tokenizer_config.json", {k: v for k, v in tok_config.items() if v is not None}
    )
    for name, data in (("config.json", model_config), ("generation_config.json", gen_config)):
        if data is not None:
            _write_json(path / name, data)
    return path


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def hf_auto():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained


# --- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_single_bos(llama3_dir: Path, text: str) -> None:
    tok = Tokenizer.from_dir(llama3_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text.replace(BOS, "").replace(EOT, "")
    assert tok.decode(ids, skip_special_tokens=False) == BOS + text
    assert ids[0] == tok.bos_token_id and ids[1:].count(tok.bos_token_id) == text.count(BOS)
    assert tok.encode(text, add_special_tokens=False) == ids[1:]


def test_config_flag_does_not_add_bos_twice(tmp_path: Path, hf_auto) -> None:
    model_dir = make_model_dir(tmp_path, config={"add_bos_token": True})
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode("Hello world")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids == hf_auto(str(model_dir)).encode("Hello world")


def test_flags_apply_without_post_processor(tmp_path: Path) -> None:
    cfg = {"add_bos_token": True, "add_eos_token": True}
    tok = Tokenizer.from_dir(make_model_dir(tmp_path, post_processor=False, config=cfg))
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == [tok.bos_token_id, *plain, tok.eos_token_ids[0]]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


@pytest.mark.parametrize(
    ("post_processor", "config"),
    [(True, {}), (False, {}), (True, {"add_bos_token": False}), (True, {"add_eos_token": True})],
    ids=["llama3", "no-post-processor", "bos-flag-false", "eos-flag-true"],
)
def test_encode_decode_match_transformers(
    tmp_path: Path, hf_auto, post_processor: bool, config: dict[str, Any]
) -> None:
    # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists: its
    # post-processor alone decides; without one, nothing is added.
    model_dir = make_model_dir(tmp_path, post_processor=post_processor, config=config)
    tok, hf = Tokenizer.from_dir(model_dir), hf_auto(str(model_dir))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        )
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )


def test_special_ids_and_vocab_size(llama3_dir: Path, hf_auto) -> None:
    tok, hf = Tokenizer.from_dir(llama3_dir), hf_auto(str(llama3_dir))
    assert tok.special_ids == frozenset(hf.convert_tokens_to_ids(SPECIALS))
    assert tok.vocab_size == len(hf)


def test_added_tokens_decoder_registers_missing_tokens(tmp_path: Path) -> None:
    extra = {"content": "<|python_tag|>", "special": True, "normalized": False}
    config = {"added_tokens_decoder": {"400": extra}, "pad_token": {"content": "<pad>"}}
    tok = Tokenizer.from_dir(make_model_dir(tmp_path, config=config))
    ids = tok.encode("a<|python_tag|>b<pad>", add_special_tokens=False)
    assert len(tok.special_ids) == len(SPECIALS) + 2
    assert tok.special_ids & set(ids) and tok.decode(ids) == "ab"


# --- special token ids -----------------------------------------------------------------------


def test_eos_ids_gathered_from_all_configs(tmp_path: Path) -> None:
    model_dir = make_model_dir(
        tmp_path,
        model_config={"eos_token_id": [1, 4], "bos_token_id": 0},
        gen_config={"eos_token_id": 3},
    )
    tok = Tokenizer.from_dir(model_dir)
    eot = tok.encode(EOT, add_special_tokens=False)[0]
    assert tok.eos_token_ids == (eot, 1, 3) == (4, 1, 3)
    assert tok.bos_token_id == 0


def test_ids_fall_back_to_config_json(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, model_config={"bos_token_id": 0, "eos_token_id": 1})
    (model_dir / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(model_dir)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,)
    assert tok.encode("Hello")[0] == 0  # the post-processor still adds BOS


# --- chat templates --------------------------------------------------------------------------


def _hf_chat_ids(hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out if isinstance(out, list) else out["input_ids"])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    llama3_dir: Path, hf_auto, add_generation_prompt: bool
) -> None:
    tok, hf = Tokenizer.from_dir(llama3_dir), hf_auto(str(llama3_dir))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text == expected
    assert text.startswith(BOS + HEADER_START + "system" + HEADER_END + "\n\n")
    assert text.endswith("assistant<|end_header_id|>\n\n" if add_generation_prompt else EOT)
    ids = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ids == _hf_chat_ids(hf, MESSAGES, add_generation_prompt)
    assert ids.count(tok.bos_token_id) == 1


def test_chat_template_tojson_and_list_format(tmp_path: Path, hf_auto) -> None:
    template = (
        "{% for m in messages %}{{ m | tojson }}\n{{ m['content'] | tojson(indent=2) }}{% endfor %}"
        "{{ eos_token }}[{{ pad_token }}]{% if add_generation_prompt %}>{% endif %}"
    )
    chat_template = [
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": template},
    ]
    model_dir = make_model_dir(tmp_path, config={"chat_template": chat_template})
    tok, hf = Tokenizer.from_dir(model_dir), hf_auto(str(model_dir))
    messages = [{"role": "user", "content": '<b>é</b> & "q"', "name": None}]
    text = tok.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert '"<b>é</b>' in text and '"name"' not in text and text.endswith(EOT + "[]>")


def test_generation_tag_and_loop_controls_match_transformers(tmp_path: Path, hf_auto) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% if m['role'] == 'assistant' %}{% generation %}[{{ m['content'] }}]{% endgeneration %}"
        "{% else %}\n  {{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    model_dir = make_model_dir(tmp_path, config={"chat_template": template})
    tok, hf = Tokenizer.from_dir(model_dir), hf_auto(str(model_dir))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert "[Paris.]" in text and "system" not in text


def test_chat_template_jinja_file_takes_priority(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path)
    (model_dir / "chat_template.jinja").write_text(
        "{{ messages[0]['content'] }}!", encoding="utf-8"
    )
    assert (
        Tokenizer.from_dir(model_dir).apply_chat_template(MESSAGES) == MESSAGES[0]["content"] + "!"
    )


def test_raise_exception_in_template(tmp_path: Path, hf_auto) -> None:
    template = (
        "{% if messages[0]['role'] not in ['system', 'user'] %}"
        "{{ raise_exception('Conversation must start with a system or user message') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    tok = Tokenizer.from_dir(make_model_dir(tmp_path, config={"chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ChatTemplateError, match="must start with a system or user") as info:
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert isinstance(info.value, TokenizerError) and isinstance(info.value, ValueError)


def test_broken_template_is_chat_template_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(make_model_dir(tmp_path, config={"chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.apply_chat_template(MESSAGES)


def test_missing_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(make_model_dir(tmp_path, config={"chat_template": None}))
    with pytest.raises(TokenizerError, match="chat_template.*--chat"):
        tok.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": BOS})
    with pytest.raises(TokenizerError, match=r"tokenizer\.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


# --- streaming decode ------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Feed ``ids`` to a TextStream one at a time (as the engine does), then finish it."""
    stream = TextStream(tok, stop_strings=())
    return [stream.update(ids[: n + 1]) for n in range(len(ids))] + [stream.finish()]


@pytest.mark.parametrize("text", ["Hello world, this is a test.", "café 🙂 日本 naïve!", "é"])
def test_text_stream_byte_level(llama3_dir: Path, text: str) -> None:
    tok = Tokenizer.from_dir(llama3_dir)
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_holds_back_split_characters(llama3_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama3_dir)
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) == 4  # unseen in training: one token per UTF-8 byte
    assert _stream(tok, ids) == ["", "", "", "🚀", ""]


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama2")
    _byte_fallback_bpe().save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    _write_json(path / "tokenizer_config.json", {**config, "add_bos_token": True})
    return path


def test_byte_fallback_matches_transformers(llama2_dir: Path, hf_auto) -> None:
    tok, hf = Tokenizer.from_dir(llama2_dir), hf_auto(str(llama2_dir))
    for text in ["Hello café, 🙂 world!", "  two  spaces ", ""]:
        ids = tok.encode(text)
        assert ids == hf.encode(text) and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_text_stream_byte_fallback(llama2_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama2_dir)
    text = "Hello café, 🙂 world!"
    ids = tok.encode(text) + [tok.eos_token_ids[0]]
    assert ids[0] == tok.bos_token_id == 1 and tok.decode(ids) == text
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[:4] == ["", "", "H", "e"]  # BOS, then a lone "▁" that Strip removes


def test_text_stream_finish_emits_incomplete_tail(llama3_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama3_dir)
    ids = tok.encode("🚀", add_special_tokens=False)[:2]
    stream = TextStream(tok, stop_strings=())
    assert [stream.update(ids[: n + 1]) for n in range(len(ids))] == ["", ""]
    assert stream.finish() == tok.decode(ids) and stream.finish() == ""
