"""What the commands print: a generation as it streams, summaries, progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import click

from edgetp.cli.options import generation_settings, sampling_settings


def log(line: str) -> None:
    """A progress line, on standard error."""
    click.echo(line, err=True)


def prompt_lines(prompts: Iterable[str]) -> Iterator[str]:
    """The prompts given, or else one per non-empty line of standard input."""
    given = tuple(prompts)
    lines = given or (line.rstrip("\n") for line in sys.stdin)
    return (line for line in lines if line.strip())


def run_generation(master: Any, prompt_text: str, chat: bool, opts: dict[str, Any],
                   summary: bool = True) -> Any:
    """Generate with ``master`` and print the stream (or one JSON object)."""
    from edgetp.runtime.master import Prompt

    stream = None if opts["as_json"] else _print_piece
    result = master.generate(Prompt(prompt_text, chat=chat), sampling_settings(opts),
                             generation_settings(opts), stream)
    if opts["as_json"]:
        click.echo(json.dumps(result.to_json()))
    elif summary:
        click.echo()
        log(f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
            f"TTFT {result.ttft_ms:.1f} ms, {result.ms_per_token:.2f} ms/token, "
            f"stopped: {result.finish_reason}]")
        if result.speculation is not None:
            stats = result.speculation
            log(f"[speculation: {stats.steps} steps, {stats.accepted}/{stats.drafted} drafted "
                f"tokens kept ({stats.acceptance:.0%})]")
    return result


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def latency_summary(result: Any, nodes: int, traffic: Any) -> str:
    """The demo's closing lines: tokens, TTFT, ms/token, and the master's traffic per token."""
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


def transfer_progress(node: str, name: str, done: int, total: int) -> None:
    """One shard file's copy to a node, redrawn in place."""
    end = "\n" if done >= total else ""
    click.echo(f"\r  {node}: {name} {done / 2**20:.1f}/{total / 2**20:.1f} MiB{end}", nl=False,
               err=True)
