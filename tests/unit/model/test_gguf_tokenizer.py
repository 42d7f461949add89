"""The tokenizer a GGUF converts to, against transformers' own GGUF tokenizer (the oracle)."""

from __future__ import annotations

import json

import pytest
from helpers.gguf_files import write_gguf

from edgetp.model.gguf import convert_gguf
from edgetp.model.tokenizer import Tokenizer

VOCAB = 320
TEXTS = [
    "hello world, the tiny model is testing text.",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "The cat's dog isn't here; they'll see 12345 and 3.14!",
    "IT'S 123 45 12345 then  \n\n  spaces \n and (hello) [world]",
    "Ünïcödé — 日本語のテキスト 🙂 emoji, naïve café",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<s>the</s> <unk> control tokens in plain text",
    "",
]
VOCABS = [("gpt2", "smollm"), ("gpt2", "llama-bpe"), ("gpt2", "qwen2"), ("gpt2", "gpt2"),
          ("llama", "")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from helpers.hf_models import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("gguf_tok"), "llama32", vocab_size=VOCAB)


def converted(model, tmp_path, vocab, pre):
    path = write_gguf(model[0], tmp_path / "m.gguf", vocab=vocab, pre=pre)
    return path, convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize(("vocab", "pre"), VOCABS)
def test_ids_equal_transformers_gguf_tokenizer(model, tmp_path, vocab, pre):
    import transformers

    path, out = converted(model, tmp_path, vocab, pre)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_dir(out)
    for text in TEXTS:
        if pre == "smollm" and any(c.isdigit() for c in text):
            continue  # transformers splits no digits here; llama.cpp does (next test)
        want = reference(text)["input_ids"]
        assert ours.encode(text) == want, text
        assert ours.decode(want, skip_special_tokens=False) == reference.decode(want), text


def test_smollm_splits_every_digit_as_llama_cpp_does(model, tmp_path):
    """llama.cpp's smollm pre-tokenizer cuts digits apart before the GPT-2 expression (as
    SmolLM's own tokenizer), though the test vocabulary has a merged "123"."""
    _, out = converted(model, tmp_path, "gpt2", "smollm")
    tk = Tokenizer.from_dir(out)
    pieces = [tk.decode([i]) for i in tk.encode("in 123")]
    assert pieces == ["in", " ", "1", "2", "3"]
    (tmp_path / "gpt2").mkdir()
    _, gpt2 = converted(model, tmp_path / "gpt2", "gpt2", "gpt2")
    plain = Tokenizer.from_dir(gpt2)
    assert [plain.decode([i]) for i in plain.encode("in 123")] == ["in", " ", "123"]


def test_sentencepiece_adds_bos_and_falls_back_to_bytes(model, tmp_path):
    _, out = converted(model, tmp_path, "llama", "")
    tk = Tokenizer.from_dir(out)
    ids = tk.encode("the ü")
    assert ids[0] == 1  # <s>: add_bos_token defaults on for SentencePiece, as llama.cpp
    assert tk.decode(ids) == "the ü"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    byte_ids = {3 + b for b in "ü".encode()}  # <0xC3> <0xBC>: after <unk> <s> </s>
    assert byte_ids <= set(ids)


def test_control_tokens_are_special_and_whole(model, tmp_path):
    _, out = converted(model, tmp_path, "gpt2", "smollm")
    tk = Tokenizer.from_dir(out)
    assert tk.encode("<|im_start|>hello<|im_end|>")[0] == 1
    assert tk.encode("<|im_start|>hello<|im_end|>")[-1] == 2
    assert {0, 1, 2} <= tk.special_ids
    assert tk.decode(tk.encode("<|im_start|>the<|im_end|>")) == "the"
    chat = tk.apply_chat_template([{"role": "user", "content": "hi"}],
                                  add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
