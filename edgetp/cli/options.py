"""The options several commands share, and their values turned into library settings.

Library modules are imported inside the functions, so ``edgetp --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from edgetp.config.generation import GenerationConfig, SamplingConfig
    from edgetp.runtime.start import MasterOptions

F = TypeVar("F", bound=Callable[..., Any])

WEIGHT_DTYPES = ["float32", "bfloat16", "float16", "int8", "int4", "native"]  # edgetp.shard.split's
HEAD_DTYPES = ["int8", "int4", "same", "float"]  # edgetp.shard.quant's


class ModelSource(click.ParamType):
    """MODEL_DIR: a Hugging Face model directory, or a ``.gguf`` file, which is converted into
    the cache on first use (with a progress bar) and stands for its conversion after."""

    name = "model"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Path:
        if isinstance(value, Path) and value.is_dir():
            return value
        path = Path(value)
        if path.is_dir():
            return path
        if path.is_file() and path.suffix.lower() == ".gguf":
            return converted_gguf(path)
        what = "does not exist" if not path.exists() else "is neither a directory nor a .gguf"
        self.fail(f"{value} {what}: give a Hugging Face model directory or a .gguf file",
                  param, ctx)


MODEL_SOURCE = ModelSource()


def converted_gguf(path: Path) -> Path:
    """The cached conversion of the GGUF file ``path`` (made now, with a progress bar, if new)."""
    from edgetp.shard.gguf_cache import model_dir_for

    with conversion_progress() as progress:
        return model_dir_for(path, progress, log=lambda line: click.echo(line, err=True))


@contextlib.contextmanager
def conversion_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback ``(tensor, bytes done, bytes total)`` drawing a bar on standard
    error, opened at the first call (nothing is drawn when nothing is converted)."""
    state: dict[str, Any] = {"done": 0}

    def progress(_name: str, done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(
                length=total, label="converting", file=sys.stderr,
                item_show_func=lambda _: f"{state['done'] / 2**20:.1f} MiB")
            state["bar"].__enter__()
        state["bar"].update(done - state["done"])
        state["done"] = done

    try:
        yield progress
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


def _apply(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def generation_options(func: F) -> F:
    """Options shared by every command that generates text."""
    return _apply(func, [
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
                     help="context to preallocate (default: the model's maximum, or as much "
                          "of it as fits a quarter of this machine's available memory)"),
        click.option("--json", "as_json", is_flag=True, help="print one JSON object"),
        click.option("--draft", default=None,
                     help="speculative decoding: 'lookup' (drafts from the text so far) or "
                          "a small model's directory with this model's tokenizer (run on the "
                          "master); greedy output is unchanged"),
        click.option("--draft-tokens", type=click.IntRange(1, 64), default=7,
                     show_default=True, help="with --draft: the most tokens a step drafts "
                                             "(it adapts below that)"),
    ])


def generation_options_but_stop(func: F) -> F:
    """``generation_options`` without ``--stop TEXT``: for ``launch``, --stop stops the cluster."""
    params = generation_options(lambda: None).__click_params__  # type: ignore[attr-defined]
    func.__click_params__ = [  # type: ignore[attr-defined]
        *getattr(func, "__click_params__", []), *(p for p in params if p.name != "stop_strings")]
    return func


memory_budget_option = click.option(
    "--memory-budget", default=None,
    help="bytes this node may use for weights, KV cache and buffers (e.g. 1.5GiB); "
         "weights that do not fit stream from disk")


threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="threads a node computes on (default: every core of this machine; a local cluster "
         "divides them among its nodes)")


def cluster_options(func: F) -> F:
    """Options for running as (or starting) a cluster."""
    return _apply(func, [
        click.option("--wire-dtype", type=click.Choice(["f32", "bf16", "int8"]), default="f32",
                     show_default=True,
                     help="activation dtype on the wire (int8: a float32 scale per 64 values, "
                          "each block's largest value exact)"),
        click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
                     help="seconds to wait for a node before failing the request"),
        memory_budget_option,
        click.option("--allreduce", type=click.Choice(["star", "ring"]), default="star",
                     show_default=True, help="allreduce algorithm (the master decides)"),
        threads_option,
    ])


group_size_option = click.option(
    "--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
    callback=lambda _ctx, _param, value: int(value),
    help="int4: input columns per scale (shrunk per tensor to divide its slices)")


head_dtype_option = click.option(
    "--head-dtype", type=click.Choice(HEAD_DTYPES), default=None,
    help="how the lm_head (a tied one too) is stored: int8, int4, same (as the layers) or "
         "float (unquantized)  [default: int8 for int4 weights, else same]")


def weight_options(func: F) -> F:
    """How a local cluster stores the weights it splits (``generate --nodes N``)."""
    func = head_dtype_option(group_size_option(func))
    return click.option(
        "--weight-dtype", type=click.Choice(WEIGHT_DTYPES), default=None,
        help="split the weights in this dtype: int8 (a scale and a low end per 32 columns) "
             "or int4 (group-wise) quantize the linears; native: a GGUF's own Q4_0/Q4_1 or "
             "Q8_0 blocks as they are (default: the checkpoint's)")(func)


def master_sources(func: F) -> F:
    """MODEL_DIR [--nodes --shares --private-layers] or --shards DIR --bind ADDRESS [keys]."""
    return _apply(func, [
        click.argument("model_dir", required=False, type=MODEL_SOURCE),
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
    ])


# -- option values as library settings ---------------------------------------------------------

def byte_size(text: str | None) -> int | None:
    """``--memory-budget 1.5GiB`` in bytes."""
    from edgetp.core.units import parse_bytes

    return None if text is None else parse_bytes(text)


def node_shares(text: str | None, nodes: int) -> tuple[float, ...] | None:
    """``--shares 2,1,1`` for ``nodes`` nodes; None when not given (equal shares)."""
    from edgetp.shard.plan import parse_shares

    return parse_shares(text, nodes) if text else None


def master_options(opts: dict[str, Any]) -> MasterOptions:
    """The master's settings from the generation, cluster and weight options (and serve's
    --max-batch: without it, one sequence at a time)."""
    from edgetp.core.limits import default_kv_slots
    from edgetp.runtime.start import MasterOptions

    max_batch = opts.get("max_batch", 1) or default_kv_slots(byte_size(opts.get("memory_budget")))
    return MasterOptions(
        dtype=opts["dtype"], max_seq_len=opts["max_seq_len"],
        wire_dtype=opts.get("wire_dtype", "f32"), timeout_s=opts.get("timeout_s", 10.0),
        memory_budget=byte_size(opts.get("memory_budget")),
        allreduce=opts.get("allreduce", "star"), weight_dtype=opts.get("weight_dtype"),
        group_size=opts.get("group_size") or 32, head_dtype=opts.get("head_dtype"),
        threads=opts.get("threads"), draft=opts.get("draft"),
        draft_tokens=opts.get("draft_tokens") or 7, max_batch=max_batch)


def sampling_settings(opts: dict[str, Any]) -> SamplingConfig:
    from edgetp.config.generation import SamplingConfig

    return SamplingConfig(
        temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
        repetition_penalty=opts["repetition_penalty"], seed=opts["seed"])


def generation_settings(opts: dict[str, Any]) -> GenerationConfig:
    from edgetp.config.generation import GenerationConfig

    return GenerationConfig(max_new_tokens=opts["max_new_tokens"],
                            stop_strings=tuple(opts["stop_strings"]))


def api_key_from_env() -> str | None:
    """``--api-key``'s default: ``$EDGETP_API_KEY``."""
    from edgetp.core.settings import api_key

    return api_key()


def master_from_sources(model_dir: Path | None, shard_dir: Path | None, bind: str, nodes: int,
                        shares: str | None, private_layers: int, opts: dict[str, Any]) -> Any:
    """The master of ``serve``/``chat`` (a context manager): a model here, or a cluster's."""
    import contextlib

    from edgetp.runtime.start import cluster_master, local_master, master_security

    if (model_dir is None) == (shard_dir is None):
        raise click.UsageError("give MODEL_DIR (this machine, or --nodes N on loopback) or "
                               "--shards DIR (the master of a cluster)"
                               + (", not both" if model_dir is not None else ""))
    if shard_dir is not None:
        security = master_security(bind, opts["keys_file"], opts["authorized"],
                                   opts["insecure"])
        master = cluster_master(shard_dir, bind, master_options(opts), security)
        click.echo(f"master listening for workers on {master.address}", err=True)
        return contextlib.closing(master)
    assert model_dir is not None
    return local_master(model_dir, nodes, node_shares(shares, nodes), private_layers,
                        master_options(opts))
