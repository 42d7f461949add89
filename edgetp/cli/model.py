"""``edgetp split``: a checkpoint into one shard directory per rank; ``edgetp convert``: a GGUF
file into a Hugging Face model directory; ``edgetp synth-split``: a split of a random model of a
preset's shape (:mod:`edgetp.shard.synthetic`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from edgetp.cli.options import (
    MODEL_SOURCE,
    WEIGHT_DTYPES,
    conversion_progress,
    group_size_option,
    head_dtype_option,
)


@click.command()
@click.argument("model_dir", type=MODEL_SOURCE)
@click.option("--nodes", type=int, required=True, help="number of ranks (devices)")
@click.option("--shares", default=None, help="relative work per rank, e.g. 2,1,1")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="output directory (gets rank-0 ... rank-N-1)")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPES), default=None,
              help="stored weight dtype (default: the checkpoint's); int8: a scale and a "
                   "low end per 32 columns, int4: group-wise (--group-size); native: a GGUF's "
                   "own "
                   "Q4_0/Q4_1 (int4) or Q8_0 (int8) blocks as they are; norms, embedding and "
                   "biases stay float")
@group_size_option
@head_dtype_option
@click.option("--force", is_flag=True, help="replace a different split in --out")
@click.option("--private-layers", type=int, default=0, show_default=True,
              help="keep the first and last K layers whole on the master (rank 0)")
def split(model_dir: Path, nodes: int, shares: str | None, out_dir: Path, dtype: str | None,
          group_size: int, head_dtype: str | None, force: bool, private_layers: int) -> None:
    """Split MODEL_DIR into one shard directory per rank."""
    from edgetp.config.model import load_model_config
    from edgetp.shard.plan import parse_shares
    from edgetp.shard.split import describe_split, expected_files, split_checkpoint

    share_values = parse_shares(shares, nodes)
    total = expected_files(load_model_config(model_dir), nodes, private_layers)
    with _progress_bar(total, "splitting") as progress:
        result = split_checkpoint(model_dir, out_dir, nodes, share_values, dtype, force, progress,
                                  private_layers, group_size, head_dtype)
    click.echo(describe_split(result))


@contextlib.contextmanager
def _progress_bar(files: int, label: str) -> Iterator[Callable[[str, int], None]]:
    """A progress bar over ``files`` weight files, with the MiB written; yields the callback
    the splitters take (file written, its size)."""
    written = {"bytes": 0}
    with click.progressbar(range(files), label=label, file=sys.stderr,
                           item_show_func=lambda _: f"{written['bytes'] / 2**20:.1f} MiB"
                           ) as bar:
        def progress(_path: str, size: int) -> None:
            written["bytes"] += size
            bar.update(1)

        yield progress


@click.command("synth-split")
@click.option("--preset", "model", required=True,
              help="the model's shape: a preset (llama2-70b, llama3.1-70b, ...; see `edgetp "
                   "plan --help`) or a model directory's config.json")
@click.option("--ranks", "--nodes", "ranks", type=int, required=True,
              help="number of ranks (devices)")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPES), default="int4", show_default=True,
              help="stored weight dtype (int4/int8 quantize the linears; norms and embedding "
                   "keep the config's float dtype)")
@group_size_option
@click.option("--seed", type=int, default=0, show_default=True, help="same seed, same bytes")
@click.option("--layers", type=int, default=None,
              help="decoder layers (default: the model's; fewer for a smaller run)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="output directory (gets rank-0 ... rank-N-1)")
@click.option("--force", is_flag=True, help="replace a different split in --out")
def synth_split(model: str, ranks: int, dtype: str, group_size: int, seed: int,
                layers: int | None, out_dir: Path, force: bool) -> None:
    """Write a ready split of a random model of a preset's shape (no checkpoint needed)."""
    from edgetp.config.model import parse_hf_config
    from edgetp.perf.presets import hf_config
    from edgetp.shard.split import describe_split, expected_files
    from edgetp.shard.synthetic import write_synthetic_split

    config = hf_config(model)
    if layers is not None:
        if layers < 1:
            raise click.BadParameter(f"{layers}: at least 1", param_hint="--layers")
        config["num_hidden_layers"] = layers
    total = expected_files(parse_hf_config(config), ranks)
    with _progress_bar(total, "writing") as progress:
        result = write_synthetic_split(config, out_dir, ranks, dtype, seed, group_size, force,
                                       progress)
    click.echo(describe_split(result))


@click.command()
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="the Hugging Face model directory to write")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True,
              help="weights' dtype; auto: the file's float type if every matrix has it, else "
                   "float32 (exact for dequantized blocks)")
@click.option("--force", is_flag=True, help="replace what --out holds")
def convert(gguf_file: Path, out_dir: Path, dtype: str, force: bool) -> None:
    """Convert GGUF_FILE (llama.cpp's format) into a Hugging Face model directory."""
    from edgetp.model.gguf import convert_gguf

    with conversion_progress() as progress:
        convert_gguf(gguf_file, out_dir, progress, dtype, force)
    click.echo(f"wrote {out_dir} (config.json, tokenizer, safetensors); every edgetp command "
               f"also takes {gguf_file} itself in place of a model directory")
