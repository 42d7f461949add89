"""distributed-llama beside edgetp in one run: ``benchmarks/decode.py --dllama DIR``.

This VM's memory rate moves by up to 2x within minutes, so a peer's figures from another day
(or even another hour) say little against edgetp's. With ``--dllama DIR`` the decode
benchmark runs distributed-llama (https://github.com/b4rtaz/distributed-llama) right after each
of its own points, on the same model, with the same node count and threads per node, and
prints the two side by side.

``DIR`` is a distributed-llama checkout that the user cloned and built (``make dllama``);
nothing of it is part of edgetp, and nothing here builds it. What is done with it:

* the benchmark model (a Hugging Face directory) is converted once per weight type by the
  checkout's own ``converter/convert-hf.py`` into ``WORK/dllama_model_bench_TYPE.m`` (the
  converter wants ``hidden_act`` in ``config.json``, which the synthetic model leaves to the
  Llama default, so it reads a copy of the config with ``"hidden_act": "silu"`` beside links
  to the weights);
* the tokenizer is written by the checkout's ``converter/tokenizer-writer.py`` from the
  model's ``tokenizer.json`` vocabulary (every token's text, scores by id);
* a point runs ``dllama worker`` for every node but the root, then ``dllama inference`` with a
  prompt of digits and as many steps as the prompt plus edgetp's new tokens, and reads its
  ``Prediction`` figure (ms per generated token, the prompt's evaluation left out, as
  edgetp's ms/token leaves out its prompt).

Weights: edgetp's float32 against distributed-llama's ``f32`` (activations in float32) and
int4 against ``q40`` (4-bit weights in blocks of 32, activations in ``q80``, 8-bit); its CPU
matmuls take no other weights, so bfloat16 and int8 points run alone. A run that fails is
reported with the last lines it printed; the benchmark goes on.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgetp.ops.testbed.resources import stop_process
from edgetp.runtime.lifeline import death_signal_preexec, spawn_tied
from edgetp.runtime.local import free_port

# edgetp weights -> (distributed-llama weight type, its buffer (activation) type)
# (its CPU matmuls take f32 or q40 weights: none for edgetp's bfloat16 or int8)
WEIGHT_TYPES = {"float32": ("f32", "f32"), "int4": ("q40", "q80")}
PROMPT = "1234567"  # digits: single tokens in every vocabulary the benchmark writes
RUN_TIMEOUT_S = 600.0
WORKER_START_S = 0.5  # a worker listens within this (distributed-llama retries nothing)
PREDICTION = re.compile(r"^Prediction\s*\n\s*nTokens:\s*(\d+)\s*\n\s*tokens/s:\s*[\d.]+\s*"
                        r"\(([\d.]+) ms/tok\)", re.MULTILINE)


class PeerFailed(RuntimeError):
    """distributed-llama could not convert or run; the message says what it printed."""


def check_checkout(checkout: Path) -> str | None:
    """What is missing in ``checkout`` for a run (None: nothing)."""
    if not (checkout / "dllama").is_file():
        return (f"no dllama binary in {checkout}: clone distributed-llama there and build it "
                "(make dllama)")
    for script in ("convert-hf.py", "tokenizer-writer.py"):
        if not (checkout / "converter" / script).is_file():
            return f"no converter/{script} in {checkout}: is it a distributed-llama checkout?"
    return None


def parse_prediction(output: str) -> tuple[int, float]:
    """(generated tokens, ms per token) from ``dllama inference``'s closing report."""
    match = PREDICTION.search(output)
    if match is None:
        raise PeerFailed("no 'Prediction' figure in dllama's output:\n" + tail(output))
    return int(match.group(1)), float(match.group(2))


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class DistributedLlama:
    """One checkout, run from ``work`` (the converted models and tokenizer live there)."""

    checkout: Path
    work: Path
    python: str = sys.executable
    progress: Callable[[str], None] = print

    @property
    def binary(self) -> Path:
        return self.checkout / "dllama"

    # -- conversion ------------------------------------------------------------------------

    def model_file(self, model_dir: Path, weights: str) -> Path:
        """The benchmark model in distributed-llama's format (converted once)."""
        kind = WEIGHT_TYPES[weights][0]
        out = self.work / f"dllama_model_bench_{kind}.m"
        if out.exists():
            return out
        source = self._converter_source(model_dir)
        self.progress(f"distributed-llama: converting the model to {kind} (its convert-hf.py)")
        proc = subprocess.run([self.python, str(self.checkout / "converter" / "convert-hf.py"),
                               str(source), kind, "bench"], cwd=self.work,
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            out.unlink(missing_ok=True)  # a half-written model is not reused
            raise PeerFailed(f"convert-hf.py {kind} failed (exit {proc.returncode}):\n"
                             + tail(proc.stdout + proc.stderr))
        return out

    def _converter_source(self, model_dir: Path) -> Path:
        """``model_dir``'s weights beside a config that names its activation."""
        source = self.work / "dllama_source"
        source.mkdir(parents=True, exist_ok=True)
        config = json.loads((model_dir / "config.json").read_text())
        config.setdefault("hidden_act", "silu")  # the Llama default, left out by the writer
        (source / "config.json").write_text(json.dumps(config))
        for weights in model_dir.glob("*.safetensors"):
            link = source / weights.name
            if not link.exists():
                link.symlink_to(weights.resolve())
        return source

    def tokenizer_file(self, model_dir: Path) -> Path:
        out = self.work / "dllama_tokenizer_bench.t"
        if out.exists():
            return out
        vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        config = json.loads((model_dir / "config.json").read_text())
        tokens = [text for text, _ in sorted(vocab.items(), key=lambda item: item[1])]
        script = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
                  "w = __import__('tokenizer-writer'); a = json.load(sys.stdin); "
                  "f = open(sys.argv[2], 'wb'); "
                  "w.writeTokenizer(f, [t.encode() for t in a['tokens']], "
                  "[-float(i) for i in range(len(a['tokens']))], None, a['bos'], True, "
                  "[a['eos']]); f.close()")
        vocabulary = json.dumps({"tokens": tokens, "bos": config.get("bos_token_id", 1),
                                 "eos": config.get("eos_token_id", 2)})  # too long for argv
        proc = subprocess.run([self.python, "-c", script, str(self.checkout / "converter"),
                               str(out)], input=vocabulary, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0 or not out.exists():
            out.unlink(missing_ok=True)
            raise PeerFailed(f"tokenizer-writer.py failed (exit {proc.returncode}):\n"
                             + tail(proc.stdout + proc.stderr))
        return out

    # -- runs ------------------------------------------------------------------------------

    def ms_per_token(self, model_dir: Path, weights: str, threads: list[int],
                     new_tokens: int) -> float:
        """One run of ``len(threads)`` nodes (each its threads): ms per generated token."""
        model = self.model_file(model_dir, weights)
        tokenizer = self.tokenizer_file(model_dir)
        buffer = WEIGHT_TYPES[weights][1]
        ports = [free_port() for _ in threads[1:]]
        workers = [self._start_worker(port, n) for port, n in zip(ports, threads[1:],
                                                                   strict=True)]
        try:
            command = [str(self.binary), "inference", "--model", str(model), "--tokenizer",
                       str(tokenizer), "--buffer-float-type", buffer, "--prompt", PROMPT,
                       "--steps", str(len(PROMPT) + 1 + new_tokens), "--nthreads",
                       str(threads[0]), "--max-seq-len", str(len(PROMPT) + 1 + new_tokens + 8)]
            if ports:
                command += ["--workers", *(f"127.0.0.1:{p}" for p in ports)]
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, cwd=self.work,
                                  preexec_fn=death_signal_preexec(signal.SIGKILL))
            if proc.returncode != 0:
                raise PeerFailed(f"dllama inference exited with {proc.returncode}:\n"
                                 + tail(proc.stdout + proc.stderr))
            return parse_prediction(proc.stdout)[1]
        except subprocess.TimeoutExpired as exc:
            raise PeerFailed(f"dllama inference took over {RUN_TIMEOUT_S:g} s") from exc
        finally:
            for worker in workers:  # it serves one root, then waits for the next forever
                stop_process(worker)

    def _start_worker(self, port: int, threads: int) -> subprocess.Popen[bytes]:
        worker = spawn_tied([str(self.binary), "worker", "--port", str(port), "--nthreads",
                             str(threads)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=self.work, preexec_fn=death_signal_preexec(signal.SIGKILL))
        try:
            worker.wait(timeout=WORKER_START_S)
        except subprocess.TimeoutExpired:
            return worker  # listening
        raise PeerFailed(f"dllama worker on port {port} exited at once ({worker.returncode})")
