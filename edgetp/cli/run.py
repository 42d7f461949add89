"""Commands that run a model on this machine: ``generate``, ``demo`` and ``chat``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgetp.cli.options import (
    MODEL_SOURCE,
    api_key_from_env,
    cluster_options,
    generation_options,
    master_from_sources,
    master_options,
    master_sources,
    node_shares,
    weight_options,
)
from edgetp.cli.output import latency_summary, run_generation
from edgetp.model.demo import DEMO_PROMPT


@click.command()
@click.argument("model_dir", type=MODEL_SOURCE)
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
def generate(model_dir: Path, prompt: str, chat: bool, nodes: int, shares: str | None,
             private_layers: int, **opts: Any) -> None:
    """Generate a continuation of PROMPT with the model in MODEL_DIR."""
    from edgetp.runtime.start import local_master

    with local_master(model_dir, nodes, node_shares(shares, nodes), private_layers,
                      master_options(opts)) as master:
        run_generation(master, prompt, chat, opts)


@click.command()
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option("--nodes", type=int, default=4, show_default=True)
def demo(prompt: str, nodes: int) -> None:
    """Run the bundled known-answer model on a local cluster of NODES processes.

    The model was trained on one rule: "count by K : A" continues A+K, A+2K, ... up to 99.
    """
    from edgetp.model.demo import DEMO_MODEL_DIR
    from edgetp.runtime.start import MasterOptions, local_cluster

    click.echo(f"model: bundled demo ({DEMO_MODEL_DIR}); rule: 'count by K : A' continues "
               "A+K A+2K ... up to 99")
    click.echo(f"starting {nodes} nodes on loopback (1 master + {nodes - 1} workers) ...")
    opts = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
            "seed": None, "max_new_tokens": 128, "stop_strings": (), "as_json": False}
    with local_cluster(DEMO_MODEL_DIR, nodes, options=MasterOptions()) as master:
        click.echo(f"prompt: {prompt}")
        click.echo("output: ", nl=False)
        result = run_generation(master, prompt, False, opts, summary=False)
        click.echo()
        traffic = master.traffic if nodes > 1 else None
    click.echo(latency_summary(result, nodes, traffic))


@click.command()
@master_sources
@click.option("--url", default=None,
              help="chat with a running `edgetp serve` (http://HOST:PORT) instead")
@click.option("--api-key", default=api_key_from_env,
              help="with --url: the server's API key (default: $EDGETP_API_KEY)")
@click.option("--system", default=None, help="a system prompt")
@generation_options
@cluster_options
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
        with master_from_sources(model_dir, shard_dir, bind, nodes, shares, private_layers,
                                 opts) as master:
            failures = run_chat(LocalChat(master, options), sys.stdin, sys.stdout, sys.stderr,
                                system, opts["as_json"])
    if failures:
        sys.exit(1)
