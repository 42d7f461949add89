"""edgetp.runtime.engine: TextStream's stop strings, the Engine loop over a scripted runner,
LocalRunner."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from helpers.tiny import EOS, ByteCodec, codec_for

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.runtime.engine import Engine, GenerationResult, LocalRunner, TextStream

GREEDY = SamplingConfig(temperature=0.0)


def stream_pieces(
    codec: ByteCodec, ids: list[int], stops: Sequence[str]
) -> tuple[list, TextStream]:
    stream = TextStream(codec, stop_strings=stops)
    pieces = []
    for n in range(len(ids)):
        pieces.append(stream.update(ids[: n + 1]))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


# --- TextStream ---------------------------------------------------------------------------------


def test_stream_without_stop_strings_is_the_decoded_text():
    codec = codec_for("Hel", "lo", " wor", "ld")
    pieces, stream = stream_pieces(codec, [1, 2, 3, 4], ())
    assert pieces == ["Hel", "lo", " wor", "ld", ""]
    assert stream.text == "Hello world" and not stream.stopped


def test_stop_string_spanning_several_tokens_is_never_emitted():
    codec = codec_for("ab", "c<", "/s", ">", "tail")
    pieces, stream = stream_pieces(codec, [1, 2, 3, 4, 5], ["</s>"])
    assert stream.stopped and stream.text == "abc"
    assert pieces == ["ab", "c", "", "", ""]  # "<", "</s" held back, then cut
    assert not any(ch in piece for piece in pieces for ch in "</s>")


def test_text_is_cut_at_the_first_stop_string():
    # "ab" starts before "bc" in "xabc": the cut is at the earlier one, whatever the order.
    codec = codec_for("x", "abc", "more")
    pieces, stream = stream_pieces(codec, [1, 2, 3], ["bc", "ab"])
    assert stream.stopped and stream.text == "x" and pieces == ["x", "", ""]
    # One token holding text, the stop string and more: only the text before it counts.
    pieces, stream = stream_pieces(codec_for("hi<|end|>bye"), [1], ["<|end|>"])
    assert pieces == ["hi", ""] and stream.text == "hi"
    # A stop string at the very start leaves no text.
    pieces, stream = stream_pieces(codec_for("<|e", "nd|>"), [1, 2], ["<|end|>"])
    assert stream.stopped and pieces == ["", "", ""] and stream.text == ""


def test_false_stop_prefix_is_released_later():
    codec = codec_for("x<", "/", "y", "z")
    pieces, stream = stream_pieces(codec, [1, 2, 3, 4], ["</s>"])
    assert not stream.stopped
    assert pieces == ["x", "", "</y", "z", ""]
    assert "".join(pieces) == stream.text == "x</yz"


def test_held_back_stop_prefix_is_released_by_finish():
    codec = codec_for("answer", " <")
    pieces, stream = stream_pieces(codec, [1, 2], ["<|eot|>", " <<"])
    assert pieces == ["answer", "", " <"] and not stream.stopped


def test_longest_stop_prefix_is_held_back():
    codec = codec_for("x", "a", "a", "c")
    pieces, stream = stream_pieces(codec, [1, 2, 3, 4], ["aab"])
    # "xa" holds "a"; "xaa" holds "aa" (not only "a"); "xaac" releases everything.
    assert pieces == ["x", "", "", "aac", ""] and not stream.stopped
    # With several stop strings the longest held-back prefix of any of them counts.
    pieces, stream = stream_pieces(codec, [1, 2, 3, 4], ["ab", "aac!"])
    assert pieces == ["x", "", "", "", "aac"] and stream.text == "xaac"


def test_multibyte_characters_split_over_byte_tokens():
    rocket = "🚀".encode()
    codec = codec_for(b"go ", *(bytes([b]) for b in rocket), b"!")
    ids = [1, 2, 3, 4, 5, 6]
    pieces, stream = stream_pieces(codec, ids, ())
    assert pieces == ["go ", "", "", "", "🚀", "!", ""]
    assert "".join(pieces) == codec.decode(ids) == "go 🚀!"
    # A multi-byte stop string split over byte tokens: nothing of it leaks, no U+FFFD either.
    pieces, stream = stream_pieces(codec, ids, ["🚀"])
    assert stream.stopped and stream.text == "go " and "".join(pieces) == "go "
    assert not any("\ufffd" in piece for piece in pieces)


# --- Engine with a scripted runner --------------------------------------------------------------


class ScriptedRunner:
    """Returns logits whose argmax is the next scripted token; records every call."""

    def __init__(self, script: Sequence[int], vocab: int = 16, max_seq_len: int = 64) -> None:
        self.script = list(script)
        self.vocab = vocab
        self.max_seq_len = max_seq_len
        self.calls: list[tuple[list[int], int]] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1
        self.calls.clear()

    def logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        assert tokens.dtype == torch.int64 and tokens.dim() == 1 and tokens.numel() > 0
        assert start_pos + tokens.numel() <= self.max_seq_len
        step = len(self.calls)
        self.calls.append((tokens.tolist(), start_pos))
        out = torch.zeros(self.vocab)
        out[self.script[step % len(self.script)]] = 5.0
        return out

    @property
    def positions(self) -> list[int]:
        return [pos for _, pos in self.calls]


CODEC = codec_for("a", "b", "c", "d", "<", "/s", ">")  # ids 1..7


def run(
    script: Sequence[int],
    prompt: Sequence[int] = (3, 4, 5),
    max_seq_len: int = 64,
    codec: ByteCodec = CODEC,
    **gen: object,
) -> tuple[GenerationResult, ScriptedRunner, list[str]]:
    runner = ScriptedRunner(script, max_seq_len=max_seq_len)
    pieces: list[str] = []
    result = Engine(runner, codec, eos_ids=[EOS]).generate(
        prompt, GREEDY, GenerationConfig(**gen), on_text=pieces.append
    )
    assert "".join(pieces) == result.text
    return result, runner, pieces


def test_eos_finishes_without_the_eos_token():
    result, runner, _ = run([1, 2, EOS, 3], max_new_tokens=10)
    assert result.finish_reason == "eos"
    assert result.token_ids == [1, 2] and result.text == "ab"
    assert runner.positions == [0, 3, 4]  # the EOS token is never fed back
    assert len(result.decode_ms) == 2 and result.prompt_tokens == 3


def test_eos_releases_a_held_back_stop_prefix():
    result, _, pieces = run([1, 5, EOS], max_new_tokens=10, stop_strings=("</s>",))
    assert result.finish_reason == "eos" and result.token_ids == [1, 5]
    assert pieces == ["a", "", "<"] and result.text == "a<"


def test_eos_as_first_token_gives_empty_generation():
    result, runner, pieces = run([EOS], max_new_tokens=10)
    assert result.finish_reason == "eos" and result.token_ids == [] and result.text == ""
    assert runner.positions == [0] and result.decode_ms == [] and result.ttft_ms > 0


def test_eos_is_kept_when_not_stopping_on_it():
    result, _, _ = run([1, EOS, 2], max_new_tokens=4, stop_on_eos=False)
    assert result.finish_reason == "length"
    assert result.token_ids == [1, EOS, 2, 1] and result.text == "aba"


def test_length_limit_positions_and_timings():
    prompt = [3, 4, 5, 6, 7]
    result, runner, pieces = run([1, 2, 3, 4], prompt=prompt, max_new_tokens=6)
    assert result.finish_reason == "length"
    assert result.token_ids == [1, 2, 3, 4, 1, 2] and result.text == "abcdab"
    assert runner.resets == 1
    assert runner.calls[0] == (prompt, 0)
    assert runner.calls[1:] == [([t], len(prompt) + i) for i, t in enumerate(result.token_ids[:-1])]
    assert result.ttft_ms > 0
    assert len(result.decode_ms) == len(result.token_ids) - 1
    assert all(ms >= 0 for ms in result.decode_ms)
    assert pieces[:6] == ["a", "b", "c", "d", "a", "b"]


def test_single_new_token():
    result, runner, _ = run([2], max_new_tokens=1)
    assert result.finish_reason == "length" and result.token_ids == [2]
    assert runner.positions == [0] and result.decode_ms == []
    assert result.ms_per_token == 0.0


def test_stop_string_spanning_tokens():
    # a < /s > b : "</s>" spans three tokens.
    result, runner, pieces = run([1, 5, 6, 7, 2], max_new_tokens=20, stop_strings=("</s>",))
    assert result.finish_reason == "stop"
    assert result.text == "a" and result.token_ids == [1, 5, 6, 7]
    assert not any(ch in piece for piece in pieces for ch in "</s>")
    assert runner.positions == [0, 3, 4, 5]


def test_stop_string_prefix_that_is_not_a_stop_is_released():
    result, _, pieces = run([1, 5, 6, 2, 3], max_new_tokens=5, stop_strings=("</s>",))
    assert result.finish_reason == "length" and result.text == "a</sbc"
    assert pieces[:4] == ["a", "", "", "</sb"]


def test_context_limit():
    prompt = [3, 4, 5]
    result, runner, _ = run([1, 2], prompt=prompt, max_seq_len=8, max_new_tokens=100)
    assert result.finish_reason == "context"
    # Every position of the context is used, none beyond it.
    assert runner.positions == [0, 3, 4, 5, 6, 7]
    assert all(pos + len(tokens) <= 8 for tokens, pos in runner.calls)
    # The last token is sampled from the logits of the last position.
    assert len(result.token_ids) == 8 - len(prompt) + 1
    # A prompt that just fits still generates.
    result, runner, _ = run([1], prompt=[1] * 7, max_seq_len=8, max_new_tokens=100)
    assert result.finish_reason == "context" and runner.positions == [0, 7]


def test_length_wins_over_context_when_both_are_reached():
    result, _, _ = run([1], prompt=[3, 4, 5], max_seq_len=8, max_new_tokens=6)
    assert result.finish_reason == "length" and len(result.token_ids) == 6


@pytest.mark.parametrize(
    "prompt", [[], (), [1] * 9, [1] * 8], ids=["empty", "empty-tuple", "long", "full"]
)
def test_bad_prompts_raise_value_error(prompt):
    runner = ScriptedRunner([1], max_seq_len=8)
    engine = Engine(runner, CODEC, eos_ids=[EOS])
    with pytest.raises(ValueError, match="prompt"):
        engine.generate(prompt, GREEDY, GenerationConfig())
    assert runner.calls == []


def test_engine_is_reusable_and_resets_the_runner():
    runner = ScriptedRunner([1, 2])
    engine = Engine(runner, CODEC, eos_ids=[EOS])
    first = engine.generate([3, 4], GREEDY, GenerationConfig(max_new_tokens=3))
    assert runner.positions == [0, 2, 3]
    second = engine.generate([3], GREEDY, GenerationConfig(max_new_tokens=2))
    assert runner.resets == 2 and runner.positions == [0, 1]
    assert first.token_ids == [1, 2, 1] and second.token_ids == [1, 2]


class FixedRunner(ScriptedRunner):
    """Always the same logits: token 1 at 5.0, token 2 at 1.0, the rest (EOS too) at -1."""

    def logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        self.calls.append((tokens.tolist(), start_pos))
        out = torch.full((self.vocab,), -1.0)
        out[1], out[2] = 5.0, 1.0
        return out


def test_repetition_penalty_sees_prompt_and_generated_tokens():
    engine = Engine(FixedRunner([1]), CODEC, eos_ids=[EOS])
    gen = GenerationConfig(max_new_tokens=3)
    assert engine.generate([3], GREEDY, gen).token_ids == [1, 1, 1]
    penalised = SamplingConfig(repetition_penalty=10.0)
    # Token 1 is in the prompt: 5/10 < 1 so 2 comes first; then 1 (0.5) beats 2 (0.1).
    assert engine.generate([1], penalised, gen).token_ids == [2, 1, 1]
    assert engine.generate([3], penalised, gen).token_ids == [1, 2, 1]


def test_to_json():
    result, _, _ = run([1, 2, 3], max_new_tokens=3)
    data = result.to_json()
    assert {"token_ids", "text", "prompt_tokens", "ttft_ms", "ms_per_token"} <= set(data)
    assert data["token_ids"] == [1, 2, 3] and data["text"] == "abc"
    assert data["prompt_tokens"] == 3 and data["finish_reason"] == "length"
    assert isinstance(data["ttft_ms"], float) and isinstance(data["ms_per_token"], float)
    assert json.loads(json.dumps(data)) == data


# --- LocalRunner over a tiny real model ---------------------------------------------------------


class IdCodec:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


@torch.no_grad()
def test_local_runner_chunked_prefill_gives_same_greedy_tokens(tiny_model_dir):
    from edgetp.model.checkpoint import load_model

    path, _ = tiny_model_dir("llama3")
    model = load_model(path, max_seq_len=32)
    prompt = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    gen = GenerationConfig(max_new_tokens=12, stop_on_eos=False)

    results = {}
    for chunk in (3, 256, 3):
        engine = Engine(LocalRunner(model, prefill_chunk=chunk), IdCodec(), eos_ids=[2])
        results.setdefault(chunk, []).append(engine.generate(prompt, GREEDY, gen))
    tokens = results[256][0].token_ids
    assert len(tokens) == 12 and results[256][0].finish_reason == "length"
    assert [r.token_ids for r in results[3]] == [tokens, tokens]
    assert results[3][0].text == "".join(f"<{i}>" for i in tokens)

    # The same as a plain greedy loop over the model.
    logits = model(torch.tensor(prompt), 0)[-1]
    expected = []
    for step in range(12):
        expected.append(int(logits.argmax()))
        logits = model(torch.tensor(expected[-1:]), len(prompt) + step)[0]
    assert tokens == expected

    # Chunked prefill's logits equal the one-shot ones.
    one_shot = LocalRunner(model, prefill_chunk=256).logits(torch.tensor(prompt), 0)
    chunked = LocalRunner(model, prefill_chunk=3).logits(torch.tensor(prompt), 0)
    assert (one_shot - chunked).abs().max().item() <= 1e-5
