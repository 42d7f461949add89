"""Serving many users at once: N concurrent streaming clients against ``edgetp serve``.

Run::

    .venv/bin/python benchmarks/serving.py [--clients 1,2,4,8] [--requests 200] [--prompts 16]
                                           [--new-tokens 64] [--max-prompt 512] [--dtype float32]
                                           [--max-batch B] [--timeout S] [--keep DIR] [--tiny]
                                           [--quick] [--json]

1. **Model.** The TinyLlama-1.1B-shaped Llama with random weights that ``benchmarks/decode.py``
   writes (its :func:`~decode.ensure_model`: ``--keep DIR`` keeps and reuses the work directory,
   so ``--keep`` of a decode.py run reuses its model and splits; ``--tiny`` the same family,
   small). Its tokenizer is the demo model's with one word ``w<ID>`` added for every id past the
   demo's own (``edgetp.model.synthetic.widen_tokenizer``), so each generated token streams as
   one piece of text.
2. **Cluster.** Split into 2 ranks in ``--dtype`` (decode.py's :func:`~decode.split_for`; compute
   in bfloat16 for bfloat16 weights, else float32), then ``edgetp serve --shards RANK0`` on
   loopback and one ``edgetp worker`` for rank 1 (the command lines of
   :mod:`edgetp.runtime.commands`), with the threads a local cluster gets (the cores divided
   among the nodes), a context of the longest prompt + ``--new-tokens`` + 8, and
   ``--max-batch B`` only when given (today's server decodes one sequence at a time).
3. **Workload.** ``--prompts`` prompts of token ids, seeded, their lengths log-spaced from 8 to
   512 tokens (``--quick``: 64) and shuffled; request ``i`` of a round asks for prompt
   ``i mod P``, ``--new-tokens`` tokens, greedy (temperature 0), streamed, with the official
   ``openai`` client (no retries). For each N of ``--clients`` (1 always runs first: its answers
   are the reference), N client threads each take the next request as soon as their last one
   ended; N runs ``max(P, ceil(R * N / N_max))`` requests, R = ``--requests`` (at the largest N,
   200 by default). One warm-up request (the longest prompt) runs before.
4. **Figures per N.** Aggregate tokens/s (generated tokens over the time from the first request
   to the last answer); per-stream ms/token (a request's time between its first and last
   streamed token over the tokens between them) p50/p90 over the requests; TTFT (request sent
   to first token) p50/p90, and each request's TTFT over the same prompt's TTFT at N=1;
   failed requests (an error), lost ones (a stream that ended without its finish reason and
   token count), and answers unlike the same prompt's answer at N=1.
5. **Targets** (issue 21), as ratios within the run: aggregate tokens/s at N=4 >= 3x N=1 and at
   N=8 >= 5x; per-stream ms/token p50 at N=4 <= 1.35x N=1; TTFT at N=8 under 3x the same
   prompt's at N=1 (p90 of the ratios); no failed or lost request at N=8; every answer
   identical to the same prompt served alone.

Every process started ends with the run, also on Ctrl-C, SIGTERM or an error (and the nodes end
when this process is killed: they get SIGTERM when it dies). Progress goes to stderr;
``--json`` prints one JSON object on stdout and the human report on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's own edgetp (as benchmarks/allreduce.py does)
import openai  # noqa: E402

from edgetp.model.synthetic import widen_tokenizer  # noqa: E402
from edgetp.perf.report import percentile  # noqa: E402
from edgetp.runtime.commands import ServeCommand, WorkerCommand  # noqa: E402
from edgetp.runtime.lifeline import spawn_tied  # noqa: E402
from edgetp.runtime.local import free_port  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import (  # noqa: E402  (benchmarks/decode.py: the model, its splits, the CPU)
    DTYPES,
    SEED,
    cpu_facts,
    cpu_seconds,
    ensure_model,
    model_config,
    node_threads,
    others_share,
    print_report,
    progress,
    split_for,
    work_directory,
)

NODES = 2
FIRST_ID = 4  # prompt ids start past the demo tokenizer's special tokens (<pad> <s> </s> <unk>)
FULL = {"prompts": 16, "requests": 200, "max_prompt": 512, "new_tokens": 64}
QUICK = {"prompts": 4, "requests": 16, "max_prompt": 64, "new_tokens": 16}
MIN_PROMPT = 8
NODE_TIMEOUT_S = 120.0  # serve/worker --timeout: a 512-token prefill on a loaded core is slow
START_TIMEOUT_S = 900.0  # loading both nodes of the float32 model on a loaded machine
STOP_GRACE_S = 15.0
# (name, kind, clients, limit): "throughput" and "per_stream" are ratios to N=1 (at least /
# at most), "ttft" the p90 of each request's TTFT over its prompt's at N=1 (under), "failures"
# and "answers" counts (at most)
TARGETS = (
    ("aggregate tokens/s at N=4 >= 3x N=1", "throughput", 4, 3.0),
    ("aggregate tokens/s at N=8 >= 5x N=1", "throughput", 8, 5.0),
    ("per-stream ms/token p50 at N=4 <= 1.35x N=1", "per_stream", 4, 1.35),
    ("TTFT p90 at N=8 < 3x the same prompt's at N=1", "ttft", 8, 3.0),
    ("0 failed or lost requests at N=8", "failures", 8, 0),
    ("every greedy answer identical to the same request served alone", "answers", None, 0),
)
# Runs a command with SIGTERM as its parent-death signal (Linux), so a node ends with this
# process even when it is killed; exits at once if this process is already gone.
_TIED_EXEC = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, "
              "0); os.getppid() == int(sys.argv[1]) or sys.exit(1); "
              "os.execv(sys.argv[2], sys.argv[2:])")


# -- the workload -------------------------------------------------------------------------------


def prompt_lengths(count: int, shortest: int, longest: int) -> list[int]:
    """``count`` lengths log-spaced from ``shortest`` to ``longest`` (both included), in a
    seeded shuffled order: short chats and long documents mixed."""
    if count == 1:
        return [shortest]
    ratio = (longest / shortest) ** (1 / (count - 1))
    lengths = [round(shortest * ratio**i) for i in range(count)]
    random.Random(SEED).shuffle(lengths)
    return lengths


def make_prompts(lengths: list[int], vocab: int) -> list[list[int]]:
    """One prompt of token ids per length, seeded: ids of ordinary words, no special token."""
    rng = random.Random(SEED + 1)
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(n)] for n in lengths]


def requests_at(clients: int, most_clients: int, total: int, prompts: int) -> int:
    """Requests run with ``clients`` clients: ``total`` at the most clients, proportionally
    fewer below (the same rounds per client), every prompt at least once."""
    return max(prompts, math.ceil(total * clients / most_clients))


# -- the cluster --------------------------------------------------------------------------------


@dataclass
class ClusterSpec:
    """What the two nodes run: rank directories, dtypes, threads, context and batch."""

    rank_dirs: list[Path]
    compute_dtype: str
    threads: list[int]
    max_seq_len: int
    max_batch: int | None
    queue_size: int | None
    log_dir: Path
    model_name: str


def node_commands(spec: ClusterSpec, address: str, port: int) -> tuple[list[str], list[str]]:
    """The ``edgetp serve`` (rank 0, the API on ``port``) and ``edgetp worker`` (rank 1)
    command lines; ``--max-batch`` and ``--queue-size`` only when set."""
    serve = ServeCommand(spec.rank_dirs[0], address, host="127.0.0.1", port=port,
                         timeout_s=NODE_TIMEOUT_S, model_name=spec.model_name,
                         threads=spec.threads[0]).local_argv()
    serve += ["--json", "--dtype", spec.compute_dtype, "--max-seq-len", str(spec.max_seq_len)]
    if spec.queue_size is not None:
        serve += ["--queue-size", str(spec.queue_size)]
    if spec.max_batch is not None:
        serve += ["--max-batch", str(spec.max_batch)]
    worker = WorkerCommand(spec.rank_dirs[1], address, NODE_TIMEOUT_S, spec.compute_dtype,
                           spec.max_seq_len, parent_pid=os.getpid(),
                           threads=spec.threads[1]).local_argv()
    return serve, worker


class ServedCluster:
    """``edgetp serve`` and its worker as processes on loopback (a context manager).

    Entering starts both (each in its own session, with SIGTERM as its parent-death signal)
    and waits until the API answers ``/health`` with every node joined; leaving ends both
    (SIGTERM, then SIGKILL), also when entering failed.
    """

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.serve_argv, self.worker_argv = node_commands(
            spec, f"tcp://127.0.0.1:{free_port()}", self.port)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.model = ""

    def __enter__(self) -> ServedCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, name: str, argv: list[str], threads: int) -> None:
        log = (self.spec.log_dir / f"{name}.log").open("wb")  # this run's
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _TIED_EXEC, str(os.getpid()), *argv]
        self.procs[name] = spawn_tied(argv, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE if name == "serve" else log,
                                      stderr=log, start_new_session=True)
        log.close()

    def start(self) -> None:
        self.spec.log_dir.mkdir(parents=True, exist_ok=True)
        progress(f"cluster: edgetp {' '.join(self.serve_argv[self.serve_argv.index('serve'):])}")
        self.spawn("serve", self.serve_argv, self.spec.threads[0])
        self.spawn("worker", self.worker_argv, self.spec.threads[1])
        deadline = time.monotonic() + START_TIMEOUT_S
        self.model = self.read_ready_line(deadline)["model"]
        while not self.healthy():
            self.check_running()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster was not ready in {START_TIMEOUT_S:g} s"
                                   + self.logs())
            time.sleep(0.5)
        progress(f"cluster: serving {self.model!r} at {self.url}")

    def read_ready_line(self, deadline: float) -> dict[str, Any]:
        """The JSON line ``serve --json`` prints once its API listens."""
        out = self.procs["serve"].stdout
        assert out is not None
        found: list[dict[str, Any]] = []

        def read() -> None:  # to the end: a full pipe would block the server
            for line in out:
                if line.startswith(b"{") and not found:
                    found.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while not found:
            self.check_running()
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not print its URL in time" + self.logs())
            reader.join(0.5)
        return found[0]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}" + self.logs())

    def logs(self) -> str:
        """The end of each node's log, for an error message."""
        tails = []
        for name in self.procs:
            path = self.spec.log_dir / f"{name}.log"
            text = path.read_text(errors="replace")[-2000:] if path.is_file() else ""
            tails.append(f"\n--- {name} log ({path}) ---\n{text}")
        return "".join(tails)

    def stop(self) -> None:
        """SIGTERM to the server, then the worker; SIGKILL to whichever is still running."""
        for name in ("serve", "worker"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.procs.values():
            if proc.stdout is not None:
                proc.stdout.close()


# -- the clients --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as its client saw it (times from ``time.perf_counter``)."""

    index: int  # the request's number within its N
    prompt: int  # which prompt of the pool
    started: float = 0.0
    ended: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # each streamed piece of text
    text: str = ""
    completion_tokens: int | None = None  # from the stream's usage chunk
    finish_reason: str | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        """ok, failed (an error) or lost (the stream ended without its last chunks)."""
        if self.error is not None:
            return "failed"
        if self.finish_reason is None or self.completion_tokens is None:
            return "lost"
        return "ok"


def stream_one(client: openai.OpenAI, model: str, prompt: list[int], new_tokens: int,
               outcome: Outcome) -> None:
    """Send one streamed greedy completion and record what arrives, and when."""
    outcome.started = time.perf_counter()
    pieces: list[str] = []
    try:
        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=new_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True})
        for chunk in stream:
            now = time.perf_counter()
            for choice in chunk.choices:
                if choice.text:
                    outcome.chunk_times.append(now)
                    pieces.append(choice.text)
                outcome.finish_reason = choice.finish_reason or outcome.finish_reason
            if chunk.usage is not None:
                outcome.completion_tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure, not the end
        outcome.error = f"{type(exc).__name__}: {exc}"[:300]
    outcome.ended = time.perf_counter()
    outcome.text = "".join(pieces)


def run_clients(url: str, model: str, prompts: list[list[int]], clients: int, count: int,
                new_tokens: int, timeout_s: float) -> list[Outcome]:
    """``count`` requests from ``clients`` threads, each sending its next request as soon as
    its last one ended (request ``i`` asks for prompt ``i mod len(prompts)``)."""
    outcomes = [Outcome(i, i % len(prompts)) for i in range(count)]
    taken = iter(outcomes)
    lock = threading.Lock()

    def client_loop() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=timeout_s)
        with client:
            while True:
                with lock:
                    outcome = next(taken, None)
                if outcome is None:
                    return
                stream_one(client, model, prompts[outcome.prompt], new_tokens, outcome)

    threads = [threading.Thread(target=client_loop, name=f"client-{k}", daemon=True)
               for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # short waits: Ctrl-C reaches this thread
    return outcomes


# -- figures ------------------------------------------------------------------------------------


def ms_per_token(outcome: Outcome) -> float | None:
    """The stream's time between its first and last token over the tokens between them."""
    times = outcome.chunk_times
    return None if len(times) < 2 else (times[-1] - times[0]) * 1000 / (len(times) - 1)


def ttft_ms(outcome: Outcome) -> float | None:
    return (outcome.chunk_times[0] - outcome.started) * 1000 if outcome.chunk_times else None


def spread(values: list[float]) -> dict[str, float | None]:
    """p50 and p90 (None when there are no values)."""
    if not values:
        return {"p50": None, "p90": None}
    return {"p50": percentile(values, 0.5), "p90": percentile(values, 0.9)}


@dataclass(frozen=True)
class Reference:
    """Each prompt served alone (N=1): its answer and its TTFT (median over its requests)."""

    answers: dict[int, tuple[str, int]]  # prompt -> (text, completion tokens)
    ttft_ms: dict[int, float]

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> Reference:
        answers: dict[int, tuple[str, int]] = {}
        ttfts: dict[int, list[float]] = {}
        for o in outcomes:
            if o.status == "ok" and o.completion_tokens is not None:
                answers.setdefault(o.prompt, (o.text, o.completion_tokens))
                if (t := ttft_ms(o)) is not None:
                    ttfts.setdefault(o.prompt, []).append(t)
        return cls(answers, {p: statistics.median(ts) for p, ts in ttfts.items()})


def figures(clients: int, outcomes: list[Outcome], reference: Reference) -> dict[str, Any]:
    """One N's figures (see the module's docstring)."""
    ok = [o for o in outcomes if o.status == "ok"]
    wall_s = (max(o.ended for o in outcomes) - min(o.started for o in outcomes)
              if outcomes else 0.0)
    tokens = sum(o.completion_tokens or 0 for o in ok)
    per_token = [v for o in ok if (v := ms_per_token(o)) is not None]
    ttfts = [v for o in ok if (v := ttft_ms(o)) is not None]
    vs_alone = [t / reference.ttft_ms[o.prompt] for o in ok
                if (t := ttft_ms(o)) is not None and o.prompt in reference.ttft_ms]
    checked = [o for o in ok if o.prompt in reference.answers]
    wrong = [o for o in checked
             if (o.text, o.completion_tokens) != reference.answers[o.prompt]]
    errors = sorted({o.error for o in outcomes if o.error is not None})
    return {
        "clients": clients, "requests": len(outcomes), "completed": len(ok),
        "failed": sum(o.status == "failed" for o in outcomes),
        "lost": sum(o.status == "lost" for o in outcomes),
        "tokens": tokens, "wall_s": wall_s,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "ms_per_token": spread(per_token), "ttft_ms": spread(ttfts),
        "ttft_vs_alone": spread(vs_alone),
        "mismatched_answers": len(wrong), "unchecked_answers": len(ok) - len(checked),
        "mismatched_prompts": sorted({o.prompt for o in wrong}),
        # tokens that streamed no text (special ids): ms/token then spans them
        "unstreamed_tokens": sum((o.completion_tokens or 0) - len(o.chunk_times) for o in ok),
        "errors": errors[:5],
    }


def target_value(kind: str, clients: int | None,
                 results: dict[int, dict[str, Any]]) -> float | None:
    """A target's measured figure, None when a point it needs did not run (or had no data)."""
    if kind == "answers":
        return float(sum(r["mismatched_answers"] + r["unchecked_answers"]
                         for r in results.values()))
    assert clients is not None
    point, alone = results.get(clients), results.get(1)
    if point is None or alone is None:
        return None
    if kind == "failures":
        return float(point["failed"] + point["lost"])
    if kind == "ttft":
        return point["ttft_vs_alone"]["p90"]
    if kind == "throughput":
        base, value = alone["aggregate_tokens_per_s"], point["aggregate_tokens_per_s"]
    else:
        base, value = alone["ms_per_token"]["p50"], point["ms_per_token"]["p50"]
    return None if not base or value is None else value / base


def verdict(kind: str, value: float, limit: float) -> tuple[bool, str]:
    """(met, how it reads): "throughput" is at least its limit, "ttft" under it, every
    other figure at most it."""
    if kind in ("failures", "answers"):
        return value <= limit, "met" if value <= limit else f"missed: {value:.0f}"
    met = value >= limit if kind == "throughput" else (
        value < limit if kind == "ttft" else value <= limit)
    if met:
        return True, "met"
    if kind == "throughput" and value <= 0:
        return False, "missed (no tokens)"
    missed = 100 * (limit / value - 1 if kind == "throughput" else value / limit - 1)
    return False, f"missed by {max(missed, 0.0):.0f}%"


def targets(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, kind, clients, limit in TARGETS:
        value = target_value(kind, clients, results)
        ran = clients is None or (clients in results and 1 in results)
        row: dict[str, Any] = {"name": name, "kind": kind, "clients": clients, "limit": limit,
                               "value": value, "met": None,
                               "status": "no data" if ran else "not run"}
        if value is not None:
            row["met"], row["status"] = verdict(kind, value, limit)
        if kind == "failures" and clients in results:
            row["requests"] = results[clients]["requests"]
        rows.append(row)
    return rows


# -- the report ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def describe(data: dict[str, Any]) -> list[str]:
    c, w, s, cpu = data["model"]["config"], data["workload"], data["server"], data["cpu"]
    batch = (f"--max-batch {s['max_batch']}" if s["max_batch"] is not None
             else "the server's default batch (--max-batch not passed)")
    counts = ", ".join(f"N={n}: {k}" for n, k in w["requests"].items())
    return [
        f"model: {'tiny ' if data['model']['tiny'] else 'TinyLlama-1.1B-shaped '}Llama, random "
        f"weights: hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads, vocab {c['vocab_size']}",
        f"cluster: {NODES} nodes on loopback (edgetp serve --shards + edgetp worker); weights "
        f"{s['weight_dtype']}, compute {s['compute_dtype']}; threads per node "
        f"{'+'.join(map(str, s['threads']))}; context {s['max_seq_len']}; {batch}",
        f"cpu: {cpu['model']}, {cpu['cores']} usable cores; flags {' '.join(cpu['flags'])}; "
        f"kernel paths {' '.join(f'{k}:{v}' for k, v in cpu['kernel_paths'].items())}",
        f"workload: {w['prompts']} prompts of {min(w['prompt_tokens'])}-"
        f"{max(w['prompt_tokens'])} tokens ({', '.join(map(str, w['prompt_tokens']))}), "
        f"{w['new_tokens']} new tokens each, greedy, streamed (openai {openai.__version__}); "
        f"requests {counts}",
        f"load: 1-min load average {data['load_average'][0]:.1f} before, "
        f"{data['load_average'][1]:.1f} after; other processes used "
        f"{100 * data['others_cpu_share']:.0f}% of the CPUs meanwhile"
        + (" (timings disturbed)" if data["others_cpu_share"] > 0.05 else ""),
    ]


def results_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["", "ms/token: per stream, between its first and last token; TTFT / alone: each "
             "request's TTFT over the same prompt's at N=1", "",
             "| N | requests | ok | failed | lost | wrong answers | tokens | wall s | tokens/s | "
             "ms/token p50 | p90 | TTFT ms p50 | p90 | TTFT / alone p50 | p90 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ms, ttft, alone = r["ms_per_token"], r["ttft_ms"], r["ttft_vs_alone"]
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['completed']} | {r['failed']} | "
            f"{r['lost']} | {r['mismatched_answers']} | {r['tokens']} | {r['wall_s']:.1f} | "
            f"{r['aggregate_tokens_per_s']:.2f} | {fmt(ms['p50'])} | {fmt(ms['p90'])} | "
            f"{fmt(ttft['p50'], 0)} | {fmt(ttft['p90'], 0)} | {fmt(alone['p50'], 2)} | "
            f"{fmt(alone['p90'], 2)} |")
    for r in results:
        for error in r["errors"]:
            lines.append(f"  N={r['clients']} error: {error}")
    return lines


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "targets (issue 21):", ""]
    for t in rows:
        if t["value"] is None:
            measured = ""
        elif t["kind"] in ("failures", "answers"):
            measured = f" (measured {t['value']:.0f}"
            measured += f" of {t['requests']} requests)" if "requests" in t else ")"
        else:
            measured = f" (measured {t['value']:.2f}x, limit {t['limit']:g}x)"
        lines.append(f"  {t['name']}: {t['status']}{measured}")
    return lines


def human_report(data: dict[str, Any]) -> str:
    return "\n".join(describe(data) + results_table(data["results"])
                     + targets_table(data["targets"]))


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,2,4,8",
                        help="concurrent clients, one run each (default 1,2,4,8; 1 always runs)")
    parser.add_argument("--requests", type=int, help="requests at the most clients (default "
                        f"{FULL['requests']}, --quick {QUICK['requests']})")
    parser.add_argument("--prompts", type=int, help="distinct prompts (default "
                        f"{FULL['prompts']}, --quick {QUICK['prompts']})")
    parser.add_argument("--max-prompt", type=int, help="longest prompt in tokens (default "
                        f"{FULL['max_prompt']}, --quick {QUICK['max_prompt']})")
    parser.add_argument("--new-tokens", type=int, help="tokens per answer (default "
                        f"{FULL['new_tokens']}, --quick {QUICK['new_tokens']})")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype of the split (default float32)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="passed to edgetp serve as --max-batch (default: not passed)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds a client waits for a request's next byte (default 900)")
    parser.add_argument("--keep", type=Path, help="work directory to keep and reuse (model, "
                        "splits, node logs); decode.py's --keep directory works")
    parser.add_argument("--tiny", action="store_true", help="a small model of the same family")
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests and prompts, shorter prompts and answers")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.client_counts = sorted({1} | {int(n) for n in args.clients.split(",") if n.strip()})
    if (min(args.client_counts) < 1 or args.requests < 1 or args.prompts < 1
            or args.max_prompt < MIN_PROMPT or args.new_tokens < 2
            or (args.max_batch is not None and args.max_batch < 1)):
        parser.error(f"check --clients (>= 1), --requests, --prompts, --max-batch (>= 1), "
                     f"--max-prompt (>= {MIN_PROMPT}) and --new-tokens (>= 2)")
    return args


def prepare(args: argparse.Namespace, root: Path) -> tuple[dict[str, Any], ClusterSpec]:
    """The model (with its widened tokenizer), its split, and the cluster to serve it."""
    config = model_config(args.tiny)
    model_dir = ensure_model(root, config)
    widen_tokenizer(model_dir, config["vocab_size"])
    rank_dirs = split_for(model_dir, NODES, args.dtype)
    compute = "bfloat16" if args.dtype == "bfloat16" else "float32"
    queue_size = max(args.client_counts) if max(args.client_counts) > 16 else None
    spec = ClusterSpec(rank_dirs, compute, node_threads(NODES, None),
                       args.max_prompt + args.new_tokens + 8, args.max_batch, queue_size,
                       root / "logs", "tiny-llama" if args.tiny else "tinyllama-1.1b-shaped")
    model = {"config": config, "tiny": args.tiny, "dir": str(model_dir)}
    return model, spec


def run_all(args: argparse.Namespace, cluster: ServedCluster,
            prompts: list[list[int]]) -> list[dict[str, Any]]:
    """The warm-up, then every N (1 first: the reference), each N's figures."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    run_clients(cluster.url, cluster.model, [prompts[longest]], 1, 1,
                min(args.new_tokens, 8), args.timeout)
    most, results = max(args.client_counts), []
    reference = Reference({}, {})
    for clients in args.client_counts:
        count = requests_at(clients, most, args.requests, len(prompts))
        progress(f"N={clients}: {count} requests of {args.new_tokens} tokens")
        outcomes = run_clients(cluster.url, cluster.model, prompts, clients, count,
                               args.new_tokens, args.timeout)
        if clients == 1:
            reference = Reference.of(outcomes)
        point = figures(clients, outcomes, reference)
        progress(f"N={clients}: {point['aggregate_tokens_per_s']:.2f} tokens/s, ms/token p50 "
                 f"{fmt(point['ms_per_token']['p50'])}, TTFT p90 "
                 f"{fmt(point['ttft_ms']['p90'], 0)} ms, {point['failed']} failed, "
                 f"{point['lost']} lost, {point['mismatched_answers']} wrong")
        results.append(point)
    return results


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model, spec = prepare(args, root)
    lengths = prompt_lengths(args.prompts, MIN_PROMPT, args.max_prompt)
    prompts = make_prompts(lengths, model["config"]["vocab_size"])
    load_before, cpu_before, started = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    with ServedCluster(spec) as cluster:
        results = run_all(args, cluster, prompts)
    most = max(args.client_counts)
    return {
        "model": model, "cpu": cpu_facts(),
        "server": {"weight_dtype": args.dtype, "compute_dtype": spec.compute_dtype,
                   "threads": spec.threads, "max_seq_len": spec.max_seq_len,
                   "max_batch": args.max_batch, "serve_command": cluster.serve_argv,
                   "worker_command": cluster.worker_argv},
        "workload": {"clients": args.client_counts, "prompts": args.prompts,
                     "prompt_tokens": lengths, "new_tokens": args.new_tokens,
                     "temperature": 0.0, "seed": SEED, "quick": args.quick,
                     "requests": {str(n): requests_at(n, most, args.requests, args.prompts)
                                  for n in args.client_counts}},
        "load_average": [load_before, os.getloadavg()[0]],
        "others_cpu_share": others_share(cpu_before, time.perf_counter() - started),
        "results": results,
        "targets": targets({r["clients"]: r for r in results}),
    }


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cluster's stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    with work_directory(args.keep, "edgetp-serving-") as root:
        data = measure(args, root)
    print_report(human_report(data), data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
