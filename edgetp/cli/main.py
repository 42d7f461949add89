"""The ``edgetp`` command line: thin click commands over library calls.

torch and the heavy modules are imported inside the commands, so ``edgetp --help`` is instant.
Errors a user can cause are printed as one line (``Error: ...``) with exit status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from edgetp.core.settings import api_key

F = TypeVar("F", bound=Callable[..., Any])

DEMO_PROMPT = "count by 3 : 5"  # the same as edgetp.model.demo.DEMO_PROMPT, without importing it


def user_errors(func: F) -> F:
    """Turn the exceptions a user can cause into a one-line message instead of a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, TimeoutError, ConnectionError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="edgetp")
def main() -> None:
    """edgetp: run a Llama-family model tensor-parallel across home devices."""


def generation_options(func: F) -> F:
    """Options shared by every command that generates text."""
    options = [
        click.option("--max-new-tokens", type=int, default=64, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 means greedy"),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 disables"),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", "stop_strings", multiple=True, help="stop string (repeatable)"),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
                     show_default=True, help="compute dtype"),
        click.option("--max-seq-len", type=int, default=None,
                     help="context to preallocate (default: the model's maximum)"),
        click.option("--json", "as_json", is_flag=True, help="print one JSON object"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_generation(master: Any, prompt_text: str, chat: bool, opts: dict[str, Any]) -> Any:
    """Generate with ``master`` and print the stream (or one JSON object)."""
    from edgetp.config.generation import GenerationConfig, SamplingConfig
    from edgetp.runtime.master import Prompt

    sampling = SamplingConfig(
        temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
        repetition_penalty=opts["repetition_penalty"], seed=opts["seed"],
    )
    gen = GenerationConfig(max_new_tokens=opts["max_new_tokens"],
                           stop_strings=tuple(opts["stop_strings"]))
    stream = None if opts["as_json"] else _print_piece
    result = master.generate(Prompt(prompt_text, chat=chat), sampling, gen, stream)
    if opts["as_json"]:
        click.echo(json.dumps(result.to_json()))
    elif not opts.get("quiet_summary"):
        click.echo()
        click.echo(
            f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
            f"TTFT {result.ttft_ms:.1f} ms, {result.ms_per_token:.2f} ms/token, "
            f"stopped: {result.finish_reason}]",
            err=True,
        )
    return result


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


memory_budget_option = click.option(
    "--memory-budget", default=None,
    help="bytes this node may use for weights, KV cache and buffers (e.g. 1.5GiB); "
         "weights that do not fit stream from disk")


def cluster_options(func: F) -> F:
    """Options for running as (or starting) a cluster."""
    options = [
        click.option("--wire-dtype", type=click.Choice(["f32", "bf16", "int8"]), default="f32",
                     show_default=True,
                     help="activation dtype on the wire (int8: one float32 scale per row)"),
        click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
                     help="seconds to wait for a node before failing the request"),
        memory_budget_option,
        click.option("--allreduce", type=click.Choice(["star", "ring"]), default="star",
                     show_default=True, help="allreduce algorithm (the master decides)"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


WEIGHT_DTYPES = ["float32", "bfloat16", "float16", "int8", "int4"]  # edgetp.shard.split's
group_size_option = click.option(
    "--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
    callback=lambda _ctx, _param, value: int(value),
    help="int4: input columns per scale (shrunk per tensor to divide its slices)")


def weight_options(func: F) -> F:
    """How a local cluster stores the weights it splits (``generate --nodes N``)."""
    func = group_size_option(func)
    return click.option(
        "--weight-dtype", type=click.Choice(WEIGHT_DTYPES), default=None,
        help="split the weights in this dtype: int8 (per-channel) or int4 (group-wise) "
             "quantize the linears (default: the checkpoint's)")(func)


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="the prompt text")
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@click.option("--nodes", type=int, default=1, show_default=True,
              help="run as a local cluster of this many processes on loopback")
@click.option("--shares", default=None, help="relative work per node, e.g. 2,1,1")
@click.option("--private-layers", type=int, default=0, show_default=True,
              help="the master runs the first and last K layers whole")
@generation_options
@cluster_options
@weight_options
@user_errors
def generate(model_dir: Path, prompt: str, chat: bool, nodes: int, shares: str | None,
             private_layers: int, **opts: Any) -> None:
    """Generate a continuation of PROMPT with the model in MODEL_DIR."""
    from edgetp.runtime.master import Master

    if (nodes == 1 and private_layers == 0 and opts["memory_budget"] is None
            and opts["weight_dtype"] is None):
        master = Master.local(model_dir, dtype=opts["dtype"], max_seq_len=opts["max_seq_len"])
        run_generation(master, prompt, chat, opts)
        return
    with local_cluster(model_dir, nodes, shares, private_layers, opts) as master:
        run_generation(master, prompt, chat, opts)


def local_cluster(model_dir: Path, nodes: int, shares: str | None, private_layers: int,
                  opts: dict[str, Any]) -> Any:
    from edgetp.runtime.local import LocalCluster
    from edgetp.shard.plan import parse_shares

    return LocalCluster(model_dir, nodes, parse_shares(shares, nodes) if shares else None,
                        dtype=opts["dtype"], max_seq_len=opts["max_seq_len"],
                        private_layers=private_layers, wire_dtype=opts["wire_dtype"],
                        timeout_s=opts["timeout_s"],
                        memory_budget=_budget(opts.get("memory_budget")),
                        allreduce=opts.get("allreduce", "star"),
                        weight_dtype=opts.get("weight_dtype"),
                        group_size=opts.get("group_size") or 32)


def _budget(text: str | None) -> int | None:
    from edgetp.core.units import parse_bytes

    return None if text is None else parse_bytes(text)


@main.command()
@click.option("--shard", "shard_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="this node's rank-K directory from `edgetp split`")
@click.option("--master", "master_address", required=True, help="tcp://HOST:PORT of the master")
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--max-seq-len", type=int, default=None)
@memory_budget_option
@click.option("--key", "key_file", type=click.Path(path_type=Path), default=None,
              help="this worker's NAME.key_secret (from `edgetp keys`)")
@click.option("--master-key", "master_key_file", type=click.Path(path_type=Path), default=None,
              help="the master's public NAME.key: the only master this worker talks to")
@click.option("--insecure", is_flag=True, help="no encryption or authentication (trusted "
              "networks only; required to run without keys on a non-loopback address)")
@click.option("--capture-frames", type=click.Path(path_type=Path), default=None, hidden=True,
              help="append every received frame to this file (privacy tests)")
@user_errors
def worker(shard_dir: Path, master_address: str, timeout_s: float, dtype: str,
           max_seq_len: int | None, memory_budget: str | None, key_file: Path | None,
           master_key_file: Path | None, insecure: bool, capture_frames: Path | None) -> None:
    """Serve one rank's share of the model to the master at MASTER."""
    from edgetp.runtime.master import parse_dtype
    from edgetp.runtime.worker import Worker, frame_recorder

    setup_logging()
    frame_log = frame_recorder(capture_frames) if capture_frames else None
    security = worker_security(master_address, key_file, master_key_file, insecure)
    Worker(shard_dir, master_address, timeout_s, parse_dtype(dtype), max_seq_len,
           frame_log, _budget(memory_budget), security).serve()


def worker_security(address: str, key_file: Path | None, master_key_file: Path | None,
                    insecure: bool) -> Any:
    from edgetp.net.security import KeyPair, SecurityError, WorkerSecurity, is_loopback

    if key_file and master_key_file:
        return WorkerSecurity(KeyPair.load(key_file), KeyPair.load(master_key_file).public)
    if key_file or master_key_file:
        raise SecurityError("give both --key (this worker's secret) and --master-key")
    if not insecure and not is_loopback(address):
        raise SecurityError(f"{address} is not loopback: give --key and --master-key (see "
                            "`edgetp keys`), or --insecure on a network you trust")
    return None


def master_security(bind: str, key_file: Path | None, authorized: Path | None,
                    insecure: bool) -> Any:
    from edgetp.net.security import KeyPair, MasterSecurity, SecurityError, is_loopback

    if key_file and authorized:
        return MasterSecurity(KeyPair.load(key_file), authorized)
    if key_file or authorized:
        raise SecurityError("give both --keys (the master's secret) and --authorized DIR")
    if not insecure and not is_loopback(bind):
        raise SecurityError(f"{bind} is not loopback: give --keys and --authorized (see "
                            "`edgetp keys`), or --insecure on a network you trust")
    return None


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True)
@click.option("--name", required=True, help="e.g. master, or the device's name")
@user_errors
def keys(out_dir: Path, name: str) -> None:
    """Create a CURVE key pair: NAME.key (public, share it) and NAME.key_secret (keep it)."""
    from edgetp.net.security import create_keys

    public, secret = create_keys(out_dir, name)
    click.echo(f"public key: {public}   (give it to the master's --authorized directory, "
               f"or to workers as --master-key)\nsecret key: {secret}   (stays on this device)")


@main.command(name="master")
@click.option("--shards", "shard_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="rank-0 directory from `edgetp split` (or its parent)")
@click.option("--bind", default="tcp://0.0.0.0:5555", show_default=True)
@click.option("--prompt", "prompts", multiple=True,
              help="prompt(s) to run; without it, one prompt per line of standard input")
@click.option("--chat", is_flag=True)
@click.option("--keys", "keys_file", type=click.Path(path_type=Path), default=None,
              help="the master's NAME.key_secret (from `edgetp keys`)")
@click.option("--authorized", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory of the invited workers' public NAME.key files")
@click.option("--insecure", is_flag=True, help="no encryption or authentication (trusted "
              "networks only; required to bind a non-loopback address without keys)")
@generation_options
@cluster_options
@user_errors
def master_command(shard_dir: Path, bind: str, prompts: tuple[str, ...], chat: bool,
                   keys_file: Path | None, authorized: Path | None, insecure: bool,
                   **opts: Any) -> None:
    """Run the master: load rank 0, wait for the workers, answer prompts."""
    from edgetp.runtime.master import Master

    setup_logging()
    if (shard_dir / "rank-0").is_dir():
        shard_dir = shard_dir / "rank-0"
    security = master_security(bind, keys_file, authorized, insecure)
    master = Master.cluster(shard_dir, bind, opts["dtype"], opts["max_seq_len"],
                            opts["wire_dtype"], opts["timeout_s"],
                            memory_budget=_budget(opts["memory_budget"]),
                            allreduce=opts["allreduce"], security=security)
    try:
        click.echo(f"master listening on {master.address}", err=True)
        for line in prompts or (line.rstrip("\n") for line in sys.stdin):
            if line.strip():
                try:
                    run_generation(master, line, chat, opts)
                except RuntimeError as exc:  # a failed request; the master goes on
                    click.echo(f"error: {exc}", err=True)
    finally:
        master.close(shutdown_workers=False)


def setup_logging() -> None:
    from edgetp.core.settings import configure_logging

    configure_logging()


@main.command()
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option("--nodes", type=int, default=4, show_default=True)
@user_errors
def demo(prompt: str, nodes: int) -> None:
    """Run the bundled known-answer model on a local cluster of NODES processes.

    The model was trained on one rule: "count by K : A" continues A+K, A+2K, ... up to 99.
    """
    from edgetp.model.demo import DEMO_MODEL_DIR

    click.echo(f"model: bundled demo ({DEMO_MODEL_DIR}); rule: 'count by K : A' continues "
               "A+K A+2K ... up to 99")
    click.echo(f"starting {nodes} nodes on loopback (1 master + {nodes - 1} workers) ...")
    opts = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
            "seed": None, "max_new_tokens": 128, "stop_strings": (), "as_json": False,
            "dtype": "float32", "max_seq_len": None, "wire_dtype": "f32", "timeout_s": 10.0,
            "memory_budget": None, "allreduce": "star",
            "quiet_summary": True}
    with local_cluster(DEMO_MODEL_DIR, nodes, None, 0, opts) as master:
        click.echo(f"prompt: {prompt}")
        click.echo("output: ", nl=False)
        result = run_generation(master, prompt, False, opts)
        click.echo()
        traffic = master.traffic if nodes > 1 else None
    click.echo(latency_summary(result, nodes, traffic))


def latency_summary(result: Any, nodes: int, traffic: Any) -> str:
    tokens = max(len(result.token_ids), 1)
    lines = [
        f"nodes: {nodes}   prompt tokens: {result.prompt_tokens}   generated: "
        f"{len(result.token_ids)} ({result.finish_reason})",
        f"time to first token: {result.ttft_ms:.1f} ms   decode: {result.ms_per_token:.2f} "
        f"ms/token ({1000 / result.ms_per_token if result.ms_per_token else 0:.0f} tokens/s)",
    ]
    if traffic is not None:
        messages = sum(traffic.sent.values()) + sum(traffic.received.values())
        nbytes = traffic.bytes_sent + traffic.bytes_received
        lines.append(f"master traffic: {messages / tokens:.0f} messages and "
                     f"{nbytes / tokens / 1024:.1f} KiB per token")
    return "\n".join(lines)


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nodes", type=int, required=True, help="number of ranks (devices)")
@click.option("--shares", default=None, help="relative work per rank, e.g. 2,1,1")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="output directory (gets rank-0 ... rank-N-1)")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPES), default=None,
              help="stored weight dtype (default: the checkpoint's); int8: symmetric "
                   "per-channel, int4: group-wise (--group-size); norms, embedding and biases "
                   "stay float")
@group_size_option
@click.option("--force", is_flag=True, help="replace a different split in --out")
@click.option("--private-layers", type=int, default=0, show_default=True,
              help="keep the first and last K layers whole on the master (rank 0)")
@user_errors
def split(model_dir: Path, nodes: int, shares: str | None, out_dir: Path, dtype: str | None,
          group_size: int, force: bool, private_layers: int) -> None:
    """Split MODEL_DIR into one shard directory per rank."""
    from edgetp.config.model import load_model_config
    from edgetp.shard.plan import parse_shares
    from edgetp.shard.split import describe_split, expected_files, split_checkpoint

    share_values = parse_shares(shares, nodes)
    total = expected_files(load_model_config(model_dir), nodes, private_layers)
    written = {"bytes": 0}
    with click.progressbar(length=total, label="splitting", file=sys.stderr,
                           item_show_func=lambda _: f"{written['bytes'] / 2**20:.1f} MiB") as bar:
        def progress(_path: str, size: int) -> None:
            written["bytes"] += size
            bar.update(1, _path)

        result = split_checkpoint(model_dir, out_dir, nodes, share_values, dtype, force, progress,
                                  private_layers, group_size)
    click.echo(describe_split(result))


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--shares", default=None, help="relative work per node, e.g. 2,1,1")
@click.option("--prompt-tokens", type=int, default=32, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--private-layers", type=int, default=0, show_default=True)
@click.option("--sweep", "sweeps", multiple=True,
              help="KEY=V1,V2 (nodes, budget, wire, dtype, allreduce, link); repeat for a grid")
@click.option("--link", default=None,
              help="emulate a link profile (tpi-llm, home-wifi, gigabit; configs/links.yaml)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True)
@cluster_options
@weight_options
@user_errors
def bench(model_dir: Path, nodes: int, shares: str | None, prompt_tokens: int, new_tokens: int,
          repeat: int, warmup: int, dtype: str, private_layers: int, sweeps: tuple[str, ...],
          link: str | None, out_dir: Path, wire_dtype: str, timeout_s: float,
          memory_budget: str | None, allreduce: str, weight_dtype: str | None,
          group_size: int) -> None:
    """Measure a fixed workload on a local cluster and write a latency report to --out."""
    from edgetp.perf.bench import BenchSettings, parse_sweeps, run_bench, run_sweep, sweep_markdown
    from edgetp.perf.report import markdown
    from edgetp.shard.plan import parse_shares

    settings = BenchSettings(
        str(model_dir), nodes, parse_shares(shares, nodes) if shares else None, prompt_tokens,
        new_tokens, repeat, warmup, memory_budget, wire_dtype, dtype, private_layers,
        timeout_s=max(timeout_s, 30.0), allreduce=allreduce, weight_dtype=weight_dtype,
        group_size=group_size)
    if sweeps:
        rows = run_sweep(settings, parse_sweeps(sweeps), out_dir)
        click.echo(sweep_markdown(rows))
    else:
        click.echo(markdown(run_bench(settings, out_dir)))
    click.echo(f"written to {out_dir}/ (report.json, report.md, trace.json: open it in "
               "https://ui.perfetto.dev, *.png)")


@main.command()
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@user_errors
def report(dirs: tuple[Path, ...]) -> None:
    """Print a saved report again, or compare two (DIR1 DIR2: ratios DIR2/DIR1)."""
    from edgetp.perf.bench import load_report
    from edgetp.perf.report import compare_markdown, markdown

    if len(dirs) == 1:
        click.echo(markdown(load_report(dirs[0])))
    elif len(dirs) == 2:
        click.echo(compare_markdown(load_report(dirs[0]), load_report(dirs[1]),
                                    str(dirs[0]), str(dirs[1])))
    else:
        raise click.UsageError("give one report directory, or two to compare")


def _master_context(model_dir: Path | None, shard_dir: Path | None, bind: str, nodes: int,
                    shares: str | None, private_layers: int, opts: dict[str, Any]) -> Any:
    """A context manager yielding the master of ``serve``/``chat`` (see ``generate``)."""
    import contextlib

    from edgetp.runtime.master import Master

    if (model_dir is None) == (shard_dir is None):
        raise click.UsageError("give MODEL_DIR (this machine, or --nodes N on loopback) or "
                               "--shards DIR (the master of a cluster)"
                               + (", not both" if model_dir is not None else ""))
    if shard_dir is not None:
        if (shard_dir / "rank-0").is_dir():
            shard_dir = shard_dir / "rank-0"
        security = master_security(bind, opts["keys_file"], opts["authorized"],
                                   opts["insecure"])
        master = Master.cluster(shard_dir, bind, opts["dtype"], opts["max_seq_len"],
                                opts["wire_dtype"], opts["timeout_s"],
                                memory_budget=_budget(opts["memory_budget"]),
                                allreduce=opts["allreduce"], security=security)
        click.echo(f"master listening for workers on {master.address}",
                   err=True)
        return contextlib.closing(master)
    assert model_dir is not None
    if nodes == 1 and private_layers == 0 and opts["memory_budget"] is None:
        return contextlib.nullcontext(
            Master.local(model_dir, dtype=opts["dtype"], max_seq_len=opts["max_seq_len"]))
    return local_cluster(model_dir, nodes, shares, private_layers, opts)


def master_sources(func: F) -> F:
    """MODEL_DIR [--nodes --shares --private-layers] or --shards DIR --bind ADDRESS [keys]."""
    options = [
        click.argument("model_dir", required=False,
                       type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("--nodes", type=int, default=1, show_default=True,
                     help="run as a local cluster of this many processes on loopback"),
        click.option("--shares", default=None, help="relative work per node, e.g. 2,1,1"),
        click.option("--private-layers", type=int, default=0, show_default=True,
                     help="the master runs the first and last K layers whole"),
        click.option("--shards", "shard_dir", default=None,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="be the master of a cluster: rank-0 directory from `edgetp split`"),
        click.option("--bind", default="tcp://0.0.0.0:5555", show_default=True,
                     help="with --shards: where the workers connect"),
        click.option("--keys", "keys_file", type=click.Path(path_type=Path), default=None,
                     help="with --shards: the master's NAME.key_secret (from `edgetp keys`)"),
        click.option("--authorized", type=click.Path(file_okay=False, path_type=Path),
                     default=None,
                     help="with --shards: directory of the invited workers' public keys"),
        click.option("--insecure", is_flag=True,
                     help="with --shards: no encryption or authentication of the workers "
                          "(trusted networks only)"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@master_sources
@click.option("--host", default="127.0.0.1", show_default=True,
              help="HTTP address to listen on (0.0.0.0 exposes the API to your network)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=api_key,
              help="require `Authorization: Bearer KEY` (default: $EDGETP_API_KEY)")
@click.option("--queue-size", type=int, default=16, show_default=True,
              help="requests that may wait while one is generated; more get 429")
@click.option("--model-name", default=None,
              help="the model id of the API (default: the model directory's name)")
@generation_options
@cluster_options
@user_errors
def serve(model_dir: Path | None, nodes: int, shares: str | None, private_layers: int,
          shard_dir: Path | None, bind: str, host: str, port: int, api_key: str | None,
          queue_size: int, model_name: str | None, **opts: Any) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

    Sampling options are the defaults of requests that leave them out; --json prints one JSON
    line ({"url", "model"}) once the server is ready.
    """
    from edgetp.config.generation import SamplingConfig
    from edgetp.serve.server import ServerSettings, default_model_name, run_server

    setup_logging()
    settings = ServerSettings(
        model_name=model_name or default_model_name(model_dir or shard_dir or "."),
        api_key=api_key or None, queue_size=queue_size,
        default_max_tokens=opts["max_new_tokens"],
        default_sampling=SamplingConfig(
            temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
            repetition_penalty=opts["repetition_penalty"], seed=opts["seed"]),
        stop_strings=tuple(opts["stop_strings"]))

    def ready(server: Any) -> None:
        click.echo(f"serving {settings.model_name} at {server.url}/v1 (Ctrl-C stops)", err=True)
        if opts["as_json"]:
            click.echo(json.dumps({"url": server.url, "model": settings.model_name}))

    with _master_context(model_dir, shard_dir, bind, nodes, shares, private_layers,
                         opts) as master:
        run_server(master, settings, host, port, ready)


@main.command()
@master_sources
@click.option("--url", default=None,
              help="chat with a running `edgetp serve` (http://HOST:PORT) instead")
@click.option("--api-key", default=api_key,
              help="with --url: the server's API key (default: $EDGETP_API_KEY)")
@click.option("--system", default=None, help="a system prompt")
@generation_options
@cluster_options
@user_errors
def chat(model_dir: Path | None, nodes: int, shares: str | None, private_layers: int,
         shard_dir: Path | None, bind: str, url: str | None, api_key: str | None,
         system: str | None, **opts: Any) -> None:
    """Chat in the terminal with the model in MODEL_DIR, or with a server (--url).

    One message per line; /reset clears the history, /exit or end of input quits. --json
    prints each reply as one JSON object instead of streaming it.
    """
    from edgetp.serve.chat import ChatOptions, LocalChat, RemoteChat, run_chat

    options = ChatOptions(max_tokens=opts["max_new_tokens"], temperature=opts["temperature"],
                          top_k=opts["top_k"], top_p=opts["top_p"],
                          repetition_penalty=opts["repetition_penalty"], seed=opts["seed"],
                          stop=tuple(opts["stop_strings"]))
    if url is not None:
        if model_dir is not None or shard_dir is not None:
            raise click.UsageError("--url talks to a server: give no MODEL_DIR or --shards")
        failures = run_chat(RemoteChat(url, options, api_key), sys.stdin, sys.stdout,
                            sys.stderr, system, opts["as_json"])
    else:
        with _master_context(model_dir, shard_dir, bind, nodes, shares, private_layers,
                             opts) as master:
            failures = run_chat(LocalChat(master, options), sys.stdin, sys.stdout, sys.stderr,
                                system, opts["as_json"])
    if failures:
        sys.exit(1)


@main.command()
@click.option("--model", "model_spec", default=None,
              help="a model directory (with config.json) or a preset such as llama2-70b "
                   "(default: the cluster file's model)")
@click.option("--cluster", "cluster_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="cluster YAML file (the launch format, with a profile per node)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8", "int4"]),
              default="float32", show_default=True,
              help="stored weights, as `edgetp split --dtype` (float: also the compute dtype)")
@click.option("--group-size", type=int, default=32, show_default=True, help="int4's group")
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True,
              help="tokens generated (ms/token is predicted at their middle)")
@click.option("--context", type=int, default=None,
              help="KV cache positions preallocated, as --max-seq-len (default: the model's)")
@click.option("--optimize-shares", is_flag=True, help="propose per-node --shares")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@user_errors
def plan(model_spec: str | None, cluster_file: Path, dtype: str, group_size: int,
         prompt_tokens: int, new_tokens: int, context: int | None, optimize_shares: bool,
         as_json: bool) -> None:
    """Predict memory per node, TTFT and ms/token of MODEL on CLUSTER before running it."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.perf import planner
    from edgetp.perf.presets import resolve_model, stored_float_dtype

    cluster_config = load_cluster_config(cluster_file, planning=True)
    if model_spec is None:
        if cluster_config.model == "-":
            raise click.UsageError("give --model (a model directory or a preset) or model: "
                                   "in the cluster file")
        model_spec = str(cluster_config.local_path(cluster_config.model))
    name, config = resolve_model(model_spec)
    cluster = planner.cluster_spec(cluster_config)
    storage = planner.Storage.of(dtype, stored_float_dtype(model_spec) if dtype in ("int8", "int4")
                                 else None, group_size=group_size)
    kwargs = {"dtype": storage, "prompt_tokens": prompt_tokens, "context": context,
              "new_tokens": new_tokens, "model_name": name}
    result = planner.plan_cluster(config, cluster, **kwargs)
    equal = None
    if optimize_shares:
        equal = planner.plan_cluster(config, cluster.with_shares((1.0,) * len(cluster.nodes)),
                                     **kwargs)
        result = planner.optimize_shares(config, cluster, **kwargs)
    if as_json:
        data = result.to_dict()
        if equal is not None:
            data["equal_shares_ms_per_token"] = equal.ms_per_token
        click.echo(json.dumps(data))
    else:
        click.echo(planner.render_plan(result, equal))


@main.command()
@click.option("--shard-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="a split (or rank directory): its disk and its matrix shapes")
@click.option("--master", "master_address", default=None,
              help="tcp://HOST:PORT of `edgetp probe --serve-echo PORT` (measures the link)")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the profile JSON here (default: standard output)")
@click.option("--quick", is_flag=True, help="smaller, shorter measurements (~3 s)")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
@click.option("--serve-echo", "echo_port", type=int, default=None,
              help="instead of probing, echo messages on this port for other devices' --master")
@user_errors
def probe(shard_dir: Path | None, master_address: str | None, out_file: Path | None,
          quick: bool, threads: int | None, echo_port: int | None) -> None:
    """Measure this device for the planner and write a JSON profile."""
    from edgetp.perf import probe as probing

    if echo_port is not None:
        click.echo(f"echoing on tcp://0.0.0.0:{echo_port} (Ctrl-C stops)", err=True)
        probing.serve_echo(echo_port)
        return
    data = probing.probe_device(shard_dir, master_address, quick, threads,
                                log=lambda line: click.echo(line, err=True))
    click.echo(probing.describe_profile(data), err=True)
    text = json.dumps(data, indent=1)
    if out_file is None:
        click.echo(text)
    else:
        out_file.write_text(text + "\n")
        click.echo(f"wrote {out_file}", err=True)


# -- launching on home machines and the emulated testbeds (edgetp.ops.launch, edgetp.ops.testbed) --------

def _generation_options_but_stop(func: F) -> F:
    """``generation_options`` without ``--stop TEXT``: for ``launch``, --stop stops the cluster."""
    params = generation_options(lambda: None).__click_params__  # type: ignore[attr-defined]
    func.__click_params__ = [  # type: ignore[attr-defined]
        *getattr(func, "__click_params__", []), *(p for p in params if p.name != "stop_strings")]
    return func


@main.command()
@click.argument("cluster_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stop", is_flag=True, help="stop the cluster's workers (and a --serve master)")
@click.option("--serve", is_flag=True,
              help="start `edgetp serve` on node 0, detached, instead of a master in this terminal")
@click.option("--port", type=int, default=8000, show_default=True, help="with --serve: API port")
@click.option("--transfer", type=click.Choice(["auto", "rsync", "stream"]), default="auto",
              show_default=True, help="how shards are copied (auto: rsync when both ends have it)")
@click.option("--no-ship", is_flag=True, help="do not check or copy the shards")
@click.option("--emulate-links", is_flag=True,
              help="delay every node's sends by its link profile (the transport hook)")
@click.option("--join-timeout", type=float, default=300.0, show_default=True)
@click.option("--prompt", "prompts", multiple=True,
              help="prompt(s) to run; without it, one prompt per line of standard input")
@click.option("--chat", is_flag=True)
@_generation_options_but_stop
@user_errors
def launch(cluster_file: Path, stop: bool, serve: bool, port: int, transfer: str, no_ship: bool,
           emulate_links: bool, join_timeout: float, prompts: tuple[str, ...], chat: bool,
           **opts: Any) -> None:
    """Start the cluster CLUSTER_FILE describes: check, ship shards, workers, then the master."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.ops import launch as launching

    config = load_cluster_config(cluster_file)
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    opts["stop_strings"] = ()
    if stop:
        launching.stop_cluster(config, log)
        return
    try:
        rsync_output: int | None = sys.stderr.fileno()  # rsync shows its own progress
    except (AttributeError, OSError, ValueError):
        rsync_output = None
    launcher = launching.Launcher(config, log, transfer, not no_ship, emulate_links,
                                  progress=_transfer_progress, rsync_output=rsync_output)
    launcher.prepare()
    if serve:
        click.echo(f"serving at {launcher.serve(port, join_timeout)}")
        return
    with launcher.running_master(opts["dtype"], opts["max_seq_len"], join_timeout) as master:
        for line in prompts or (line.rstrip("\n") for line in sys.stdin):
            if line.strip():
                run_generation(master, line, chat, opts)


def _transfer_progress(node: str, name: str, done: int, total: int) -> None:
    end = "\n" if done >= total else ""
    click.echo(f"\r  {node}: {name} {done / 2**20:.1f}/{total / 2**20:.1f} MiB{end}", nl=False,
               err=True)


@main.command()
@click.argument("cluster_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@user_errors
def status(cluster_file: Path, as_json: bool) -> None:
    """Show which nodes of CLUSTER_FILE are up: versions, memory, processes, round trip."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.ops import launch as launching

    config = load_cluster_config(cluster_file)
    rows = launching.cluster_status(config)
    click.echo(json.dumps(rows) if as_json else launching.render_status(config, rows))


@main.command()
@click.argument("model_dir", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nodes", type=int, default=3, show_default=True)
@click.option("--profile", default="home-wifi", show_default=True,
              help="link profile of every node (tpi-llm, home-wifi, gigabit, or --profiles)")
@click.option("--profiles", "profiles_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="YAML file of link profiles")
@click.option("--memory-budget", default=None, help="edgetp's budget per node, e.g. 256MiB")
@click.option("--memory-limit", default=None,
              help="cgroup limit per node (default: budget + 1.5GiB, or 4GiB)")
@click.option("--config", "cluster_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="a cluster file (configs/local-testbed.yaml) instead of flags")
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="also bench a fixed workload and write its report to OUT/bench")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/testbed"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@click.option("--cleanup", is_flag=True, help="remove leftover testbed namespaces, links, cgroups")
@click.option("--compose", "compose_from", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="print docker/compose.yaml for this cluster file and exit")
@click.option("--master-role", type=click.Path(dir_okay=False, path_type=Path), default=None,
              hidden=True, help="internal: run as the testbed's master (inside namespace 0)")
@user_errors
def testbed(model_dir: Path | None, nodes: int, profile: str, profiles_file: Path | None,
            memory_budget: str | None, memory_limit: str | None, cluster_file: Path | None,
            prompt: str, max_new_tokens: int, bench: bool, out_dir: Path, as_json: bool,
            cleanup: bool, compose_from: Path | None, master_role: Path | None) -> None:
    """An emulated cluster on this machine: N network namespaces (root, Linux) running MODEL_DIR."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.ops import testbed as tb

    log = lambda line: click.echo(line, err=True)  # noqa: E731
    if master_role is not None:
        sys.exit(tb.master_role(master_role))
    if compose_from is not None:
        click.echo(tb.compose_text(load_cluster_config(compose_from)), nl=False)
        return
    if cleanup:
        click.echo(f"removed {tb.cleanup_leftovers(log)} leftover testbed resources", err=True)
        return
    if cluster_file is not None:
        config = load_cluster_config(cluster_file)
    elif model_dir is not None:
        config = tb.flags_config(model_dir, nodes, profile or None, memory_budget, memory_limit,
                                 profiles_file, out_dir.resolve())
    else:
        raise click.UsageError("give MODEL_DIR (with --nodes, --profile ...) or --config FILE")
    report = tb.run_testbed(tb.TestbedRun(config, out_dir, prompt, max_new_tokens, bench), log)
    click.echo(json.dumps(report) if as_json else tb.testbed_markdown(report))


if __name__ == "__main__":
    main()
