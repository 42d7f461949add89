"""``edgetp split``: a checkpoint into one shard directory per rank."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgetp.cli.options import WEIGHT_DTYPES, group_size_option, head_dtype_option


@click.command()
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
    written = {"bytes": 0}
    with click.progressbar(range(total), label="splitting", file=sys.stderr,
                           item_show_func=lambda _: f"{written['bytes'] / 2**20:.1f} MiB"
                           ) as bar:
        def progress(_path: str, size: int) -> None:
            written["bytes"] += size
            bar.update(1)

        result = split_checkpoint(model_dir, out_dir, nodes, share_values, dtype, force, progress,
                                  private_layers, group_size, head_dtype)
    click.echo(describe_split(result))
