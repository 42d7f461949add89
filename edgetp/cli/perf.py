"""Commands that measure and predict: ``bench``, ``report``, ``plan`` and ``probe``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgetp.cli.options import (
    MODEL_SOURCE,
    cluster_options,
    converted_gguf,
    head_dtype_option,
    node_shares,
    weight_options,
)
from edgetp.cli.output import log


@click.command()
@click.argument("model_dir", type=MODEL_SOURCE)
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
def bench(model_dir: Path, nodes: int, shares: str | None, prompt_tokens: int, new_tokens: int,
          repeat: int, warmup: int, dtype: str, private_layers: int, sweeps: tuple[str, ...],
          link: str | None, out_dir: Path, wire_dtype: str, timeout_s: float,
          memory_budget: str | None, allreduce: str, weight_dtype: str | None,
          group_size: int, head_dtype: str | None, threads: int | None) -> None:
    """Measure a fixed workload on a local cluster and write a latency report to --out."""
    from edgetp.perf.bench import BenchSettings, parse_sweeps, run_bench, run_sweep, sweep_markdown
    from edgetp.perf.report import markdown

    settings = BenchSettings(
        str(model_dir), nodes, node_shares(shares, nodes), prompt_tokens, new_tokens, repeat,
        warmup, memory_budget, wire_dtype, dtype, private_layers, timeout_s=max(timeout_s, 30.0),
        allreduce=allreduce, weight_dtype=weight_dtype, group_size=group_size,
        head_dtype=head_dtype, threads=threads)
    if sweeps:
        click.echo(sweep_markdown(run_sweep(settings, parse_sweeps(sweeps), out_dir)))
    else:
        click.echo(markdown(run_bench(settings, out_dir)))
    click.echo(f"written to {out_dir}/ (report.json, report.md, trace.json: open it in "
               "https://ui.perfetto.dev, *.png)")


@click.command()
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
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


@click.command()
@click.option("--model", "model_spec", default=None,
              help="a model directory (with config.json), a .gguf file or a preset such as "
                   "llama2-70b (default: the cluster file's model)")
@click.option("--cluster", "cluster_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="cluster YAML file (the launch format, with a profile per node)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8", "int4"]),
              default="float32", show_default=True,
              help="stored weights, as `edgetp split --dtype` (float: also the compute dtype)")
@click.option("--group-size", type=int, default=32, show_default=True, help="int4's group")
@head_dtype_option
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True,
              help="tokens generated (ms/token is predicted at their middle)")
@click.option("--context", type=int, default=None,
              help="KV cache positions preallocated, as --max-seq-len (default: the model's)")
@click.option("--kv-slots", type=click.IntRange(1, 64), default=1, show_default=True,
              help="sequences each node holds keys and values for (serve's --max-batch)")
@click.option("--optimize-shares", is_flag=True, help="propose per-node --shares")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def plan(model_spec: str | None, cluster_file: Path, dtype: str, group_size: int,
         head_dtype: str | None, prompt_tokens: int, new_tokens: int, context: int | None,
         kv_slots: int, optimize_shares: bool, as_json: bool) -> None:
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
    if model_spec.lower().endswith(".gguf") and Path(model_spec).is_file():
        model_spec = str(converted_gguf(Path(model_spec)))
    name, config = resolve_model(model_spec)
    cluster = planner.cluster_spec(cluster_config)
    float_dtype = stored_float_dtype(model_spec) if dtype in ("int8", "int4") else None
    storage = planner.Storage.of(dtype, float_dtype, group_size=group_size, head=head_dtype)
    workload: dict[str, Any] = {"dtype": storage, "prompt_tokens": prompt_tokens,
                                "context": context, "new_tokens": new_tokens, "model_name": name,
                                "kv_slots": kv_slots}
    equal = None
    if optimize_shares:
        equal = planner.plan_cluster(config, cluster.with_shares((1.0,) * len(cluster.nodes)),
                                     **workload)
        result = planner.optimize_shares(config, cluster, **workload)
    else:
        result = planner.plan_cluster(config, cluster, **workload)
    if as_json:
        data = result.to_dict()
        if equal is not None:
            data["equal_shares_ms_per_token"] = equal.ms_per_token
        click.echo(json.dumps(data))
    else:
        click.echo(planner.render_plan(result, equal))


@click.command()
@click.option("--shard-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="a split (or rank directory): its disk and its matrix shapes")
@click.option("--master", "master_address", default=None,
              help="tcp://HOST:PORT of `edgetp probe --serve-echo PORT` (measures the link)")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the profile JSON here (default: standard output)")
@click.option("--quick", is_flag=True, help="smaller, shorter measurements (~3 s)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="threads to compute on, as a node with this setting (default: every core)")
@click.option("--serve-echo", "echo_port", type=int, default=None,
              help="instead of probing, echo messages on this port for other devices' --master")
def probe(shard_dir: Path | None, master_address: str | None, out_file: Path | None,
          quick: bool, threads: int | None, echo_port: int | None) -> None:
    """Measure this device for the planner and write a JSON profile."""
    from edgetp.perf import probe as probing

    if echo_port is not None:
        log(f"echoing on tcp://0.0.0.0:{echo_port} (Ctrl-C stops)")
        probing.serve_echo(echo_port)
        return
    data = probing.probe_device(shard_dir, master_address, quick, threads, log=log)
    log(probing.describe_profile(data))
    text = json.dumps(data, indent=1)
    if out_file is None:
        click.echo(text)
    else:
        out_file.write_text(text + "\n")
        log(f"wrote {out_file}")
