"""``edgetp split``: a checkpoint into one shard directory per rank; ``edgetp convert``: a GGUF
file into a Hugging Face model directory."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgetp.cli.options import MODEL_SOURCE, WEIGHT_DTYPES, conversion_progress, group_size_option


@click.command()
@click.argument("model_dir", type=MODEL_SOURCE)
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
def split(model_dir: Path, nodes: int, shares: str | None, out_dir: Path, dtype: str | None,
          group_size: int, force: bool, private_layers: int) -> None:
    """Split MODEL_DIR into one shard directory per rank."""
    from edgetp.config.model import load_model_config
    from edgetp.shard.plan import parse_shares
    from edgetp.shard.split import describe_split, expected_files, split_checkpoint

    share_values = parse_shares(shares, nodes)
    total = expected_files(load_model_config(model_dir), nodes, private_layers)
    written = {"bytes": 0}
    with click.progressbar(range(total), label="splitting", file=sys.stderr,
                           item_show_func=lambda _: f"{written['bytes'] / 2**20:.1f} MiB"
                           ) as bar:
        def progress(_path: str, size: int) -> None:
            written["bytes"] += size
            bar.update(1)

        result = split_checkpoint(model_dir, out_dir, nodes, share_values, dtype, force, progress,
                                  private_layers, group_size)
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
