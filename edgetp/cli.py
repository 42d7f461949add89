"""The ``edgetp`` command line: thin click commands over library calls.

torch and the heavy modules are imported inside the commands, so ``edgetp --help`` is instant.
Errors a user can cause are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DEMO_PROMPT = "count by 3 : 5"  # the same as edgetp.demo.DEMO_PROMPT, without importing it


def user_errors(func: F) -> F:
    """Turn the exceptions a user can cause into a one-line message instead of a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, TimeoutError, ConnectionError) as exc:
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


def run_generation(master: Any, prompt_text: str, chat: bool, opts: dict[str, Any]) -> None:
    """Generate with ``master`` and print the stream (or one JSON object)."""
    from edgetp.config import GenerationConfig, SamplingConfig
    from edgetp.master import Prompt

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
    else:
        click.echo()
        click.echo(
            f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
            f"TTFT {result.ttft_ms:.1f} ms, {result.ms_per_token:.2f} ms/token, "
            f"stopped: {result.finish_reason}]",
            err=True,
        )


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="the prompt text")
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@generation_options
@user_errors
def generate(model_dir: Path, prompt: str, chat: bool, **opts: Any) -> None:
    """Generate a continuation of PROMPT with the model in MODEL_DIR."""
    from edgetp.master import Master

    master = Master.local(model_dir, dtype=opts["dtype"], max_seq_len=opts["max_seq_len"])
    run_generation(master, prompt, chat, opts)


@main.command()
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@user_errors
def demo(prompt: str) -> None:
    """Run the bundled known-answer model ("count by K : A" continues A+K, A+2K, ...)."""
    from edgetp.demo import DEMO_MODEL_DIR
    from edgetp.master import Master

    click.echo(f"model: {DEMO_MODEL_DIR.name} (rule: 'count by K : A' continues A+K A+2K ...)")
    click.echo(f"prompt: {prompt}")
    master = Master.local(DEMO_MODEL_DIR)
    opts = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
            "seed": None, "max_new_tokens": 128, "stop_strings": (), "as_json": False}
    run_generation(master, prompt, False, opts)


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nodes", type=int, required=True, help="number of ranks (devices)")
@click.option("--shares", default=None, help="relative work per rank, e.g. 2,1,1")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="output directory (gets rank-0 ... rank-N-1)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="stored weight dtype (default: the checkpoint's)")
@click.option("--force", is_flag=True, help="replace a different split in --out")
@user_errors
def split(model_dir: Path, nodes: int, shares: str | None, out_dir: Path, dtype: str | None,
          force: bool) -> None:
    """Split MODEL_DIR into one shard directory per rank."""
    from edgetp.config import load_model_config
    from edgetp.plan import parse_shares
    from edgetp.split import describe_split, expected_files, split_checkpoint

    total = expected_files(load_model_config(model_dir), nodes)
    written = {"bytes": 0}
    with click.progressbar(length=total, label="splitting", file=sys.stderr,
                           item_show_func=lambda _: f"{written['bytes'] / 2**20:.1f} MiB") as bar:
        def progress(_path: str, size: int) -> None:
            written["bytes"] += size
            bar.update(1, _path)

        result = split_checkpoint(model_dir, out_dir, nodes, parse_shares(shares, nodes), dtype,
                                  force, progress)
    click.echo(describe_split(result))


if __name__ == "__main__":
    main()
