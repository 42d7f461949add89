"""Commands that run a cluster of machines: ``worker``, ``master``, ``keys``, ``serve``,
``launch``, ``status`` and ``testbed``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edgetp.cli.errors import is_request_failure
from edgetp.cli.options import (
    MODEL_SOURCE,
    api_key_from_env,
    byte_size,
    cluster_options,
    generation_options,
    generation_options_but_stop,
    master_from_sources,
    master_options,
    master_sources,
    memory_budget_option,
    sampling_settings,
    threads_option,
)
from edgetp.cli.output import log, prompt_lines, run_generation, transfer_progress
from edgetp.core.limits import DEFAULT_KV_SLOTS, DEFAULT_MAX_BATCH, MAX_BATCH, MAX_KV_SLOTS
from edgetp.model.demo import DEMO_PROMPT


@click.command()
@click.option("--shard", "shard_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="this node's rank-K directory from `edgetp split`")
@click.option("--master", "master_address", required=True, help="tcp://HOST:PORT of the master")
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--max-seq-len", type=int, default=None,
              help="context to preallocate (default: the model's maximum, or as much of it as "
                   "fits a quarter of this machine's available memory)")
@memory_budget_option
@click.option("--key", "key_file", type=click.Path(path_type=Path), default=None,
              help="this worker's NAME.key_secret (from `edgetp keys`)")
@click.option("--master-key", "master_key_file", type=click.Path(path_type=Path), default=None,
              help="the master's public NAME.key: the only master this worker talks to")
@click.option("--insecure", is_flag=True, help="no encryption or authentication (trusted "
              "networks only; required to run without keys on a non-loopback address)")
@click.option("--data-port", type=click.IntRange(1, 65535), default=None,
              help="the TCP port the master opens the data link to (default: an ephemeral "
                   "one); fix it to let a firewall admit the master")
@click.option("--capture-frames", type=click.Path(path_type=Path), default=None, hidden=True,
              help="append every received frame to this file (privacy tests)")
@click.option("--parent-pid", type=click.IntRange(min=1), default=None, hidden=True,
              help="exit when this process, the local cluster's master, ends")
@threads_option
@click.option("--kv-slots", type=click.IntRange(1, MAX_KV_SLOTS), default=None,
              help=f"sequences this worker holds keys and values for at once (the master's "
                   f"--max-batch uses at most the smallest of its workers'); default "
                   f"{DEFAULT_KV_SLOTS}, or 1 with --memory-budget, which counts each slot's "
                   "KV cache out of the budget")
def worker(shard_dir: Path, master_address: str, timeout_s: float, dtype: str,
           max_seq_len: int | None, memory_budget: str | None, key_file: Path | None,
           master_key_file: Path | None, insecure: bool, data_port: int | None,
           capture_frames: Path | None, parent_pid: int | None, threads: int | None,
           kv_slots: int | None) -> None:
    """Serve one rank's share of the model to the master at MASTER."""
    from edgetp.core.settings import configure_logging
    from edgetp.runtime.lifeline import follow_parent

    configure_logging()
    if parent_pid is not None:  # first: a master that dies while we load takes us along
        follow_parent(parent_pid)
    from edgetp.kernels.threads import use_threads
    from edgetp.runtime.master import parse_dtype
    from edgetp.runtime.start import worker_security
    from edgetp.runtime.worker import Worker, frame_recorder

    use_threads(threads)
    frame_log = frame_recorder(capture_frames) if capture_frames else None
    security = worker_security(master_address, key_file, master_key_file, insecure)
    Worker(shard_dir, master_address, timeout_s, parse_dtype(dtype), max_seq_len,
           frame_log, byte_size(memory_budget), security, data_port or 0, kv_slots).serve()


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True)
@click.option("--name", required=True, help="e.g. master, or the device's name")
def keys(out_dir: Path, name: str) -> None:
    """Create a CURVE key pair: NAME.key (public, share it) and NAME.key_secret (keep it)."""
    from edgetp.net.security import create_keys

    public, secret = create_keys(out_dir, name)
    click.echo(f"public key: {public}   (give it to the master's --authorized directory, "
               f"or to workers as --master-key)\nsecret key: {secret}   (stays on this device)")


@click.command(name="master")
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
def master_command(shard_dir: Path, bind: str, prompts: tuple[str, ...], chat: bool,
                   keys_file: Path | None, authorized: Path | None, insecure: bool,
                   **opts: Any) -> None:
    """Run the master: load rank 0, wait for the workers, answer prompts."""
    from edgetp.core.settings import configure_logging
    from edgetp.runtime.start import cluster_master, master_security

    configure_logging()
    security = master_security(bind, keys_file, authorized, insecure)
    master = cluster_master(shard_dir, bind, master_options(opts), security)
    try:
        log(f"master listening on {master.address}")
        for line in prompt_lines(prompts):
            try:
                run_generation(master, line, chat, opts)
            except RuntimeError as exc:  # a failed request; the master goes on
                if not is_request_failure(exc):
                    raise
                log(f"error: {exc}")
    finally:
        master.close(shutdown_workers=False)


@click.command()
@master_sources
@click.option("--host", default="127.0.0.1", show_default=True,
              help="HTTP address to listen on (0.0.0.0 exposes the API to your network)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="TCP port of the API (1-65535)")
@click.option("--api-key", default=api_key_from_env,
              help="require `Authorization: Bearer KEY` (default: $EDGETP_API_KEY)")
@click.option("--queue-size", type=int, default=16, show_default=True,
              help="requests that may wait for a KV slot (--max-batch are generated at "
                   "once); more get 429")
@click.option("--max-connections", type=int, default=64, show_default=True,
              help="HTTP connections open at once; more are answered 503 and closed")
@click.option("--model-name", default=None,
              help="the model id of the API (default: the model directory's name)")
@click.option("--max-batch", type=click.IntRange(1, MAX_BATCH), default=None,
              help=f"sequences decoding together (one row each per step; default "
                   f"{DEFAULT_MAX_BATCH}, or 1 with --memory-budget, which counts each one's "
                   "KV cache); each node holds their keys and values (workers: at most their "
                   "--kv-slots); the rest wait in the queue")
@generation_options
@cluster_options
def serve(model_dir: Path | None, nodes: int, shares: str | None, private_layers: int,
          shard_dir: Path | None, bind: str, host: str, port: int, api_key: str | None,
          queue_size: int, max_connections: int, model_name: str | None, **opts: Any) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

    Sampling options are the defaults of requests that leave them out; --json prints one JSON
    line ({"url", "model"}) once the server is ready.
    """
    from edgetp.core.settings import configure_logging
    from edgetp.serve.server import ServerSettings, default_model_name, listen_on, run_server

    configure_logging()
    settings = ServerSettings(
        model_name=model_name or default_model_name(model_dir or shard_dir or "."),
        api_key=api_key or None, queue_size=queue_size, max_connections=max_connections,
        default_max_tokens=opts["max_new_tokens"], default_sampling=sampling_settings(opts),
        stop_strings=tuple(opts["stop_strings"]))

    def ready(server: Any) -> None:
        log(f"serving {settings.model_name} at {server.url}/v1 (Ctrl-C stops)")
        if opts["as_json"]:
            click.echo(json.dumps({"url": server.url, "model": settings.model_name}))

    listener = listen_on(host, port)  # before the model loads: a taken port is said at once
    try:
        with master_from_sources(model_dir, shard_dir, bind, nodes, shares, private_layers,
                                 opts) as master:
            run_server(master, settings, host, port, ready, listener)
    finally:
        listener.close()


@click.command()
@click.argument("cluster_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stop", is_flag=True, help="stop the cluster's workers (and a --serve master)")
@click.option("--serve", is_flag=True,
              help="start `edgetp serve` on node 0, detached, instead of a master in this terminal")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="with --serve: API port (1-65535)")
@click.option("--transfer", type=click.Choice(["auto", "rsync", "stream"]), default="auto",
              show_default=True, help="how shards are copied (auto: rsync when both ends have it)")
@click.option("--no-ship", is_flag=True, help="do not check or copy the shards")
@click.option("--emulate-links", is_flag=True,
              help="delay every node's sends by its link profile (the transport hook)")
@click.option("--join-timeout", type=float, default=300.0, show_default=True)
@click.option("--prompt", "prompts", multiple=True,
              help="prompt(s) to run; without it, one prompt per line of standard input")
@click.option("--chat", is_flag=True)
@generation_options_but_stop
def launch(cluster_file: Path, stop: bool, serve: bool, port: int, transfer: str, no_ship: bool,
           emulate_links: bool, join_timeout: float, prompts: tuple[str, ...], chat: bool,
           **opts: Any) -> None:
    """Start the cluster CLUSTER_FILE describes: check, ship shards, workers, then the master."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.ops import launch as launching

    config = load_cluster_config(cluster_file)
    opts["stop_strings"] = ()
    if stop:
        launching.stop_cluster(config, log)
        return
    launcher = launching.Launcher(config, log, transfer, not no_ship, emulate_links,
                                  progress=transfer_progress, rsync_output=_stderr_fd())
    launcher.prepare()
    draft = [] if opts["draft"] is None else ["--draft", opts["draft"], "--draft-tokens",
                                               str(opts["draft_tokens"])]
    if serve:
        click.echo(f"serving at {launcher.serve(port, join_timeout, draft)}")
        return
    with launcher.running_master(opts["dtype"], opts["max_seq_len"], join_timeout) as master:
        master.use_draft(opts["draft"], opts["draft_tokens"])
        for line in prompt_lines(prompts):
            run_generation(master, line, chat, opts)


def _stderr_fd() -> int | None:
    """Standard error's descriptor, for rsync to show its own progress; None if it has none."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


@click.command()
@click.argument("cluster_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def status(cluster_file: Path, as_json: bool) -> None:
    """Show which nodes of CLUSTER_FILE are up: versions, memory, processes, round trip."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.ops import launch as launching

    config = load_cluster_config(cluster_file)
    rows = launching.cluster_status(config)
    click.echo(json.dumps(rows) if as_json else launching.render_status(config, rows))


@click.command()
@click.argument("model_dir", required=False, type=MODEL_SOURCE)
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
@click.option("--docker", "in_docker", is_flag=True,
              help="with --config: run the nodes as Docker containers (docker/compose.yaml's "
                   "services; MODEL_DIR, if given, is split for them)")
@click.option("--compose", "compose_from", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="print docker/compose.yaml for this cluster file and exit")
@click.option("--master-role", type=click.Path(dir_okay=False, path_type=Path), default=None,
              hidden=True, help="internal: run as the testbed's master (inside namespace 0)")
def testbed(model_dir: Path | None, nodes: int, profile: str, profiles_file: Path | None,
            memory_budget: str | None, memory_limit: str | None, cluster_file: Path | None,
            prompt: str, max_new_tokens: int, bench: bool, out_dir: Path, as_json: bool,
            cleanup: bool, in_docker: bool, compose_from: Path | None,
            master_role: Path | None) -> None:
    """An emulated cluster on this machine: N network namespaces (root, Linux) running MODEL_DIR,
    or with --docker the containers of a Docker compose project."""
    from edgetp.config.cluster import load_cluster_config
    from edgetp.ops import testbed as tb

    if master_role is not None:
        sys.exit(tb.master_role(master_role))
    if compose_from is not None:
        click.echo(tb.compose_text(load_cluster_config(compose_from)), nl=False)
        return
    if cleanup:
        log(f"removed {tb.cleanup_leftovers(log)} leftover testbed resources")
        return
    run_args = (prompt, max_new_tokens, bench)
    if in_docker:
        if cluster_file is None:
            raise click.UsageError("--docker runs a cluster file: give --config FILE "
                                   "(configs/docker-testbed.yaml)")
        run = tb.TestbedRun(load_cluster_config(cluster_file), out_dir, *run_args)
        report = tb.run_docker_testbed(run, model_dir, log)
        click.echo(json.dumps(report) if as_json else tb.testbed_markdown(report))
        return
    if cluster_file is not None:
        config = load_cluster_config(cluster_file)
    elif model_dir is not None:
        config = tb.flags_config(model_dir, nodes, profile or None, memory_budget, memory_limit,
                                 profiles_file, out_dir.resolve())
    else:
        raise click.UsageError("give MODEL_DIR (with --nodes, --profile ...) or --config FILE")
    report = tb.run_testbed(tb.TestbedRun(config, out_dir, *run_args), log)
    click.echo(json.dumps(report) if as_json else tb.testbed_markdown(report))
