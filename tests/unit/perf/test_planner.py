"""The planner (``edgetp.perf.planner``), the presets and ``edgetp plan`` / ``edgetp probe``.

* Memory is exact: for tiny HF models split with ``split_checkpoint`` (1, 2, 3 and 4 ranks,
  uneven shares, private layers, bfloat16), the planner's per-rank weight bytes equal the tensor
  data in each rank's manifest (the bytes between each tensor's offsets), its file bytes the
  files' sizes on disk, its KV cache ``load_rank(...).cache_bytes()``, its fixed/blocks/embedding
  ``shard_memory_needs(...)``, and under a budget its pinned/streamed split and resident bytes
  those of the window ``load_rank`` builds.
* Every preset parses to its published parameter count and plans consistently: heads and
  columns partition exactly, and each node fits its budget or the plan says by how much not.
* Share optimisation beats equal shares on unequal devices and keeps them on identical ones.
* The command line: ``plan --json``, one-line errors for bad cluster files (``probe --quick``,
  which measures the data link against a second process: tests/integration/test_probe.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers.paths import REPO

from edgetp.cli.main import main
from edgetp.config.cluster import parse_cluster_config
from edgetp.config.device import DeviceProfile
from edgetp.config.model import load_model_config
from edgetp.core.errors import ConfigError
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank, shard_memory_needs
from edgetp.perf import probe as probing
from edgetp.perf.planner import (
    ClusterSpec,
    NodeSpec,
    Storage,
    cluster_spec,
    node_plan,
    optimize_shares,
    plan_cluster,
    rank_memory,
)
from edgetp.perf.presets import PRESETS, preset_config
from edgetp.perf.probe import measure_link, serve_echo
from edgetp.shard.manifest import read_manifest
from edgetp.shard.plan import make_plan
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 48
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAPTOP = {"mem_bw_gbs": 20, "matvec_gbs": {"float32": 15, "bfloat16": 8}, "flops_gflops": 100,
          "disk_bw_mbs": 1000}

# (family, ranks, shares, private layers, dtype). llama2: 3 layers, 4 KV heads; llama3: 8 heads
# over 2 KV heads (3 ranks split query heads); qwen2: q/k/v biases; llama32: tied embeddings.
SPLITS = [
    ("llama2", 1, None, 0, "float32"),
    ("llama2", 2, None, 0, "float32"),
    ("llama2", 3, None, 0, "float32"),
    ("llama2", 3, (3, 2, 1), 1, "float32"),
    ("llama3", 3, (2, 1, 1), 0, "float32"),
    ("llama3", 4, None, 0, "bfloat16"),
    ("qwen2", 2, (1, 3), 0, "float32"),
    ("llama32", 2, None, 0, "bfloat16"),
    ("attn_bias", 3, None, 0, "float32"),
    ("mlp_bias", 2, (2, 1), 0, "float32"),
    ("llama3", 2, None, 0, "int8"),
    ("llama32", 2, (2, 1), 0, "int8"),  # tied embeddings: the quantized head is stored
    ("llama2", 2, None, 1, "int4"),
    ("qwen2", 2, None, 0, "int4"),
]
QUANT_SPLITS = [case for case in SPLITS if case[4] in ("int8", "int4")]


def _storage(dtype: str) -> Storage:
    """The tiny checkpoints are float32: a quantized split keeps float32 norms and biases."""
    return Storage.of(dtype, "float32")


def _compute(dtype: str) -> torch.dtype:
    return TORCH_DTYPES.get(dtype, torch.float32)


def _comm(rank: int, world: int) -> SoloCommunicator:
    comm = SoloCommunicator()
    comm.rank, comm.world_size = rank, world  # type: ignore[misc]
    return comm


@pytest.fixture(scope="module")
def splits(tiny_model_dir, tmp_path_factory):
    def make(family, ranks, shares, private, dtype):
        model_dir, _ = tiny_model_dir(family)
        out = tmp_path_factory.mktemp(f"plan_{family}_{ranks}_{private}_{dtype}")
        result = split_checkpoint(model_dir, out, ranks, shares, dtype=dtype,
                                  private_layers=private)
        config = load_model_config(model_dir)
        return config, make_plan(config, ranks, shares, private), result.rank_dirs

    return make


@pytest.mark.parametrize("case", SPLITS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_memory_equals_the_split_and_the_loader(splits, case):
    family, ranks, shares, private, dtype = case
    config, plan, dirs = splits(*case)
    for rank, directory in enumerate(dirs):
        manifest = read_manifest(directory)
        predicted = rank_memory(config, plan, rank, _storage(dtype), MAX_SEQ_LEN)
        data = sum(e.offsets[1] - e.offsets[0] for f in manifest.files.values()
                   for e in f.tensors.values())
        assert predicted.weight_bytes == data
        assert predicted.file_sizes == {name: (directory / name).stat().st_size
                                        for name in manifest.files}
        assert predicted.needs == shard_memory_needs(directory, _compute(dtype),
                                                     MAX_SEQ_LEN)
        model = load_rank(directory, _comm(rank, ranks), _compute(dtype), MAX_SEQ_LEN)
        assert predicted.cache_bytes == model.cache_bytes()
        batched = rank_memory(config, plan, rank, _storage(dtype), MAX_SEQ_LEN, kv_slots=3)
        assert batched.cache_bytes == 3 * predicted.cache_bytes == 3 * model.slot_bytes()
        assert batched.needs == shard_memory_needs(directory, _compute(dtype), MAX_SEQ_LEN,
                                                   kv_slots=3)


@pytest.mark.parametrize("case", [SPLITS[3], SPLITS[5], SPLITS[7], *QUANT_SPLITS[1:3]],
                         ids=lambda c: f"{c[0]}-{c[4]}")
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_pinned_blocks_equal_the_loaders_window(splits, case, fraction):
    _, ranks, _, _, dtype = case
    config, plan, dirs = splits(*case)
    for rank, directory in enumerate(dirs):
        needs = rank_memory(config, plan, rank, _storage(dtype), MAX_SEQ_LEN).needs
        low = needs.minimum()
        budget = max(low, int(low + fraction * (needs.total - 1 - low)))
        node = NodeSpec(f"n{rank}", DeviceProfile.from_dict(LAPTOP), budget)
        predicted = node_plan(node, rank, plan, rank_memory(config, plan, rank,
                                                            _storage(dtype), MAX_SEQ_LEN), 2)
        model = load_rank(directory, _comm(rank, ranks), _compute(dtype), MAX_SEQ_LEN,
                          memory_budget=budget)
        if model.window is None:  # the minimum (a ring of two blocks) already holds it all
            assert budget >= needs.total and not predicted.streams
            continue
        try:
            streamed = [n for n, p in zip(predicted.memory.block_names, predicted.pinned,
                                          strict=True) if not p]
            assert streamed == [block.name for block in model.window.streamed]
            assert predicted.resident_bytes == needs.fixed + model.window.resident_bytes
            assert predicted.resident_bytes <= budget
            assert predicted.streamed_bytes == sum(b.nbytes for b in model.window.streamed)
        finally:
            model.window.close()


# -- presets -------------------------------------------------------------------------------------

PUBLISHED_BILLIONS = {"llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98,
                      "llama3.1-8b": 8.03, "llama3.1-70b": 70.55, "llama3.2-1b": 1.24,
                      "llama3.2-3b": 3.21, "mistral-7b": 7.24, "qwen2.5-72b": 72.71,
                      "yi-34b": 34.39}


def _spec(data: dict) -> ClusterSpec:
    """A planning cluster mapping (edgetp.config.cluster's format) as the planner sees it."""
    return cluster_spec(parse_cluster_config(data, planning=True))


def _cluster(n: int, budget: str | None = "6GiB", **link) -> ClusterSpec:
    node = {"profile": LAPTOP, "count": n}
    if budget is not None:
        node["memory_budget"] = budget
    return _spec({"nodes": [node], "link": link or {"latency_ms": 1,
                                                            "bandwidth_mbit": 300}})


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_plans_consistently(name):
    config = preset_config(name)
    result = plan_cluster(config, _cluster(5), "bfloat16", context=4096, model_name=name)
    params = sum(n.memory.weight_bytes for n in result.nodes) / 2
    if 5 <= config.num_key_value_heads:  # KV heads partition: every weight is stored once
        assert params / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], abs=0.01)
    assert sum(n.q_heads for n in result.nodes) == config.num_attention_heads
    assert sum(n.mlp_columns for n in result.nodes) == config.intermediate_size
    for node in result.nodes:
        if node.shortfall:
            assert node.shortfall == node.minimum_budget - node.budget
            assert any(node.name in p and "short" in p for p in result.problems())
        else:
            assert node.resident_bytes <= node.budget
    assert result.ms_per_token > 0 and result.ttft_s > 0
    assert json.dumps(result.to_dict())


def test_published_parameter_counts_of_the_presets():
    for name, billions in PUBLISHED_BILLIONS.items():
        plan = plan_cluster(preset_config(name), _cluster(1, None), "bfloat16", context=4096)
        assert plan.nodes[0].memory.weight_bytes / 2 / 1e9 == pytest.approx(billions, abs=0.01)


def test_a_budget_below_the_minimum_says_by_how_much():
    result = plan_cluster(preset_config("llama2-70b"), _cluster(8, "200MiB"), "float32")
    assert not result.fits
    short = result.nodes[0].minimum_budget - 200 * 2**20
    assert result.nodes[0].shortfall == short
    assert "cannot run its share" in result.bottleneck()


def test_more_budget_streams_less_and_is_not_slower():
    config = preset_config("llama2-13b")
    plans = [plan_cluster(config, _cluster(2, budget), "bfloat16", context=4096)
             for budget in ("3GiB", "6GiB", "12GiB", "64GiB")]
    streamed = [p.nodes[1].streamed_bytes for p in plans]
    assert streamed == sorted(streamed, reverse=True) and streamed[-1] == 0
    times = [p.ms_per_token for p in plans]
    assert times == sorted(times, reverse=True)


def test_wire_dtype_and_allreduce_change_only_communication():
    config = preset_config("llama2-70b")

    def plan(dtype="float32", **extra):
        data = {"link": {"latency_ms": 1, "bandwidth_mbit": 300}, **extra,
                "nodes": [{"profile": LAPTOP, "count": 8, "memory_budget": "64GiB"}]}
        return plan_cluster(config, _spec(data), dtype, context=1024)

    f32, bf16, int8 = plan(), plan(wire_dtype="bf16"), plan(wire_dtype="int8")
    assert f32.decode.comm_s > bf16.decode.comm_s > int8.decode.comm_s > 0
    assert f32.decode.compute_s == bf16.decode.compute_s == int8.decode.compute_s
    # bfloat16 compute: a prefill's partials cross an f32 wire as bf16, a decode step's as f32
    # (codec.carried_format)
    f32_wire, bf16_wire = plan("bfloat16"), plan("bfloat16", wire_dtype="bf16")
    assert f32_wire.ttft_s == bf16_wire.ttft_s
    assert f32_wire.decode.comm_s == f32.decode.comm_s > bf16_wire.decode.comm_s
    # 1 ms links: the ring's 14 traversals per allreduce cost more than the star's 2
    ring = plan(allreduce="ring")
    assert ring.decode.comm_s > f32.decode.comm_s
    fast = plan(allreduce="ring", link={"latency_ms": 0.01, "bandwidth_mbit": 100})
    star_fast = plan(link={"latency_ms": 0.01, "bandwidth_mbit": 100})
    assert fast.decode.comm_s < star_fast.decode.comm_s  # bandwidth-bound: the ring wins
    with pytest.raises(ConfigError, match="allreduce"):
        plan(allreduce="tree")


# -- shares --------------------------------------------------------------------------------------

def test_optimised_shares_beat_equal_shares_on_unequal_devices():
    fast = {**LAPTOP, "matvec_gbs": 30}
    slow = {**LAPTOP, "matvec_gbs": 5, "disk_bw_mbs": 300}
    cluster = _spec({"link": {"latency_ms": 1, "bandwidth_mbit": 1000}, "nodes": [
        {"name": "desktop", "profile": fast, "memory_budget": "24GiB"},
        {"name": "laptop", "profile": LAPTOP, "memory_budget": "12GiB"},
        {"name": "pi", "profile": slow, "memory_budget": "4GiB"}]})
    config = preset_config("llama2-13b")
    equal = plan_cluster(config, cluster, "bfloat16", context=4096)
    best = optimize_shares(config, cluster, dtype="bfloat16", context=4096)
    assert best.fits and best.ms_per_token < 0.8 * equal.ms_per_token
    shares = best.cluster.shares
    assert shares[0] > shares[1] > shares[2]
    assert make_plan(config, 3, shares).ranks == best.plan.ranks  # the printed --shares works


def test_identical_devices_keep_equal_shares():
    config = preset_config("llama2-70b")
    for n in (2, 4):
        best = optimize_shares(config, _cluster(n, "24GiB"), dtype="bfloat16", context=4096)
        assert best.cluster.shares == (1.0,) * n


# -- the cluster file and the command line -------------------------------------------------------

def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_plan_cli_json(tmp_path):
    cluster = _write(tmp_path / "c.yaml", {"link": {"latency_ms": 1, "bandwidth_mbit": 300},
                                           "nodes": [{"name": "dev", "count": 8,
                                                      "memory_budget": "8GiB",
                                                      "profile": LAPTOP}]})
    result = CliRunner().invoke(main, ["plan", "--model", "llama2-70b", "--cluster",
                                       str(cluster), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["fits"] and len(data["nodes"]) == 8
    assert data["decode"]["ms_per_token"] > 0 and data["bottleneck"]
    text = CliRunner().invoke(main, ["plan", "--model", "llama2-70b", "--cluster", str(cluster),
                                     "--dtype", "bfloat16", "--optimize-shares"])
    assert text.exit_code == 0 and "--shares 1,1,1,1,1,1,1,1" in text.output


def test_plan_cli_with_a_model_dir_and_a_profile_file(tiny_model_dir, tmp_path):
    model_dir, _ = tiny_model_dir("llama3")
    (tmp_path / "p.json").write_text(json.dumps({**LAPTOP, "host": "x"}))
    cluster = _write(tmp_path / "c.yaml", {"link": {"latency_ms": 0.2, "bandwidth_mbit": 1000},
                                           "nodes": [{"profile": "p.json", "share": 2},
                                                     {"profile": "p.json"}]})
    result = CliRunner().invoke(main, ["plan", "--model", str(model_dir), "--cluster",
                                       str(cluster), "--context", "64", "--prompt-tokens", "8",
                                       "--new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "ms/token" in result.output and "shares 2,1" in result.output


def test_quantized_plans_store_fewer_bytes_for_the_same_parameters():
    config = preset_config("llama2-7b")
    plans = {d: plan_cluster(config, _cluster(2, None), d, context=1024)
             for d in ("bfloat16", "int8", "int4")}
    weights = {d: sum(n.memory.weight_bytes for n in p.nodes) for d, p in plans.items()}
    assert weights["int4"] < weights["int8"] < weights["bfloat16"]
    # int8: a byte a weight and a float16 (scale, low) pair per 32; the embedding stays bf16
    assert weights["int8"] == pytest.approx(weights["bfloat16"] * 1.125 / 2, rel=0.05)
    assert len({p.parameters for p in plans.values()}) == 1
    assert plans["int8"].parameters / 1e9 == pytest.approx(PUBLISHED_BILLIONS["llama2-7b"],
                                                           abs=0.01)
    slow_int8 = {**LAPTOP, "matvec_gbs": {"float32": 15, "bfloat16": 8, "int8": 1, "int4": 1}}
    slow = plan_cluster(config, _spec({"nodes": [{"profile": slow_int8}]}), "int8",
                        context=1024)
    assert slow.decode.compute_s > plans["int8"].decode.compute_s  # its own kernel figure
    assert plans["int8"].to_dict()["float_dtype"] == "bfloat16"
    assert DeviceProfile.from_dict(LAPTOP).matvec_gbs["int8"] == pytest.approx(15 * 0.55)


def test_a_launch_file_plans_once_it_has_profiles(tmp_path):
    data = yaml.safe_load((REPO / "configs/home-4node.yaml").read_text())
    data["link_profiles"] = {}
    cluster = _write(tmp_path / "home.yaml", data)
    result = CliRunner().invoke(main, ["plan", "--model", "llama3.2-3b", "--cluster",
                                       str(cluster)])
    assert result.exit_code == 1 and "node laptop has no profile" in result.output
    assert "edgetp probe" in result.output
    (tmp_path / "laptop.json").write_text(json.dumps(LAPTOP))
    for node in data["nodes"]:
        node["profile"] = "laptop.json"
    _write(tmp_path / "home.yaml", data)
    result = CliRunner().invoke(main, ["plan", "--model", "llama3.2-3b", "--cluster",
                                       str(cluster), "--context", "2048", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [n["name"] for n in plan["nodes"]] == ["laptop", "desktop", "pi5", "old-laptop"]
    assert plan["shares"] == [2, 2, 1, 1]  # the file's shares
    assert plan["link"]["latency_ms"] == 5 and plan["link"]["bandwidth_mbit"] == 100
    assert "laptop: 5 ms" in plan["link"]["summary"] and "gigabit" not in plan["link"]["summary"]
    assert plan["nodes"][3]["budget"] == int(1.5 * 2**30)


def test_per_node_links_set_gather_and_broadcast_latencies():
    config = preset_config("llama3.2-1b")

    def comm_ms(master_link, worker_links):
        nodes = [{"name": "m", "profile": LAPTOP, "link": master_link}]
        nodes += [{"name": f"w{i}", "profile": LAPTOP, "link": link}
                  for i, link in enumerate(worker_links)]
        return plan_cluster(config, _spec({"nodes": nodes}), "bfloat16",
                            context=1024).decode.comm_s * 1e3

    fast = {"latency_ms": 0.1}
    slow = {"latency_ms": 10.1}
    base = comm_ms(fast, [fast, fast])
    # a slow worker delays each of the 2 x 16 gathers by 10 ms
    assert comm_ms(fast, [fast, slow]) - base == pytest.approx(2 * 16 * 10, rel=1e-6)
    # a slow master delays the step broadcast and the 2 x 16 - 1 sums it sends back
    assert comm_ms(slow, [fast, fast]) - base == pytest.approx(2 * 16 * 10, rel=1e-6)


def test_two_nodes_on_the_data_link_pay_one_traversal_per_allreduce():
    """Two nodes exchange partials (both cross at once); three keep the star's gather and
    broadcast one after the other."""
    config = preset_config("llama3.2-1b")

    def comm_ms(workers: int, data_link: bool) -> float:
        nodes = [{"name": f"n{i}", "profile": LAPTOP, "link": {"latency_ms": 10}}
                 for i in range(workers + 1)]
        spec = replace(_spec({"nodes": nodes}), data_link=data_link)
        return plan_cluster(config, spec, "bfloat16", context=1024).decode.comm_s * 1e3

    # 2 x 16 allreduces: one 10 ms traversal each with the exchange, a gather and (but the
    # last) a broadcast without it; plus the step's broadcast
    assert comm_ms(1, True) == pytest.approx(32 * 10 + 10, rel=0.05)
    assert comm_ms(1, False) == pytest.approx(63 * 10 + 10, rel=0.05)
    assert comm_ms(2, True) == pytest.approx(63 * 10 + 10, rel=0.05)


def test_allreduces_over_the_data_link_cost_its_own_message_figure():
    config = preset_config("llama3.2-1b")
    profile = {**LAPTOP, "msg_overhead_us": 400, "data_msg_overhead_us": 40}

    def comm_ms(curve: bool) -> float:
        data = {"link": "gigabit", "nodes": [{"profile": profile, "count": 3}]}
        spec = cluster_spec(parse_cluster_config(data, planning=True))
        spec = replace(spec, data_link=not curve)
        return plan_cluster(config, spec, "bfloat16", context=1024).decode.comm_s * 1e3

    # 2 x 16 allreduces, each a gather and (but the last) a broadcast: 63 traversals, each
    # one worker's and two master's messages
    assert comm_ms(True) - comm_ms(False) == pytest.approx(63 * 3 * 0.36, rel=1e-6)
    assert DeviceProfile.from_dict(LAPTOP).data_msg_overhead_us == pytest.approx(0.55 * 60)


def test_a_curve_cluster_file_plans_its_allreduce_over_the_sealed_data_link(tmp_path):
    """With keys the data link is sealed (edgetp.net.sealedlink), no longer left for ZeroMQ."""
    data = {"link": "gigabit", "security": {"curve": True, "keys_dir": "keys"},
            "nodes": [{"profile": LAPTOP, "count": 2}]}
    assert cluster_spec(parse_cluster_config(data, planning=True)).data_link
    del data["security"]
    assert cluster_spec(parse_cluster_config(data, planning=True)).data_link


def test_plan_cli_takes_the_model_from_the_cluster_file(tiny_model_dir, tmp_path):
    model_dir, _ = tiny_model_dir("llama3")
    cluster = _write(tmp_path / "c.yaml", {"model": str(model_dir),
                                           "nodes": [{"profile": LAPTOP, "count": 2}],
                                           "link": "gigabit"})
    result = CliRunner().invoke(main, ["plan", "--cluster", str(cluster), "--context", "64",
                                       "--prompt-tokens", "8", "--new-tokens", "8", "--dtype",
                                       "int8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == model_dir.name and data["dtype"] == "int8"
    assert data["float_dtype"] == "float32"  # the checkpoint's, kept for norms and biases
    no_model = _write(tmp_path / "d.yaml", {"nodes": [{"profile": LAPTOP}]})
    result = CliRunner().invoke(main, ["plan", "--cluster", str(no_model)])
    assert result.exit_code == 2 and "give --model" in result.output


BAD_CLUSTERS = {
    "unknown key": ("nodes: [{profile: {mem_bw_gbs: 10}, colour: red}]\n", "colour"),
    "unknown link key": ("link: {latency_ms: 1, bandwith_mbit: 3}\n"
                         "nodes: [{profile: {mem_bw_gbs: 10}}]\n", "bandwith_mbit"),
    "no nodes": ("link: {latency_ms: 1, bandwidth_mbit: 3}\n", "nodes"),
    "no link": ("nodes: [{profile: {mem_bw_gbs: 10}, count: 2}]\n", "has no link"),
    "no profile": ("nodes: [{name: a}]\n", "node a has no profile"),
    "bad budget": ("nodes: [{profile: {mem_bw_gbs: 10}, memory_budget: lots}]\n", "lots"),
    "bad profile key": ("nodes: [{profile: {mem_bw_gbs: 10, speed: 3}}]\n", "speed"),
    "missing profile file": ("nodes: [{profile: nowhere.json}]\n", "nowhere.json"),
    "not yaml": ("nodes: [\n", "YAML"),
    "negative": ("nodes: [{profile: {mem_bw_gbs: -1}}]\n", "mem_bw_gbs"),
    "misspelt profile key": ("nodes: [{name: a, profile: {mem_bw_gbs: 10, disk_bw_mb: 3}}]\n",
                             "node a: profile: unknown profile key(s) ['disk_bw_mb'] "
                             "(did you mean 'disk_bw_mbs'?)"),
    "wrong profile type": ("nodes: [{name: a, profile: {mem_bw_gbs: fast}}]\n",
                           "node a: profile: mem_bw_gbs must be a positive number, got 'fast'"),
}


@pytest.mark.parametrize("name", list(BAD_CLUSTERS))
def test_a_bad_cluster_file_is_a_one_line_error(tmp_path, name):
    text, needle = BAD_CLUSTERS[name]
    cluster = _write(tmp_path / "c.yaml", text)
    result = CliRunner().invoke(main, ["plan", "--model", "llama2-7b", "--cluster",
                                       str(cluster)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0]


def test_a_bad_profile_file_names_the_cluster_file_the_node_and_the_key(tmp_path):
    (tmp_path / "pi.json").write_text(json.dumps({**LAPTOP, "disk_bw_mb": 300}))
    cluster = _write(tmp_path / "c.yaml", {"link": "gigabit", "nodes": [
        {"name": "laptop", "profile": LAPTOP}, {"name": "pi", "profile": "pi.json"}]})
    result = CliRunner().invoke(main, ["plan", "--model", "llama2-7b", "--cluster",
                                       str(cluster)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {cluster}: node pi: ")
    assert str(tmp_path / "pi.json") in lines[0]
    assert "unknown profile key(s) ['disk_bw_mb'] (did you mean 'disk_bw_mbs'?)" in lines[0]


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="llama2-70b"):
        preset_config("llama9-1t")


def test_probe_reads_an_int4_splits_true_widths(tiny_model_dir, tmp_path):
    model_dir, _ = tiny_model_dir("llama3")
    split = split_checkpoint(model_dir, tmp_path / "q4", 2, dtype="int4").out_dir
    config = load_model_config(model_dir)
    shapes = probing.matvec_shapes(split)
    assert (config.hidden_size, config.num_attention_heads * config.head_dim // 2) in shapes
    assert all(n_in in (config.hidden_size, config.intermediate_size // 2,
                        config.num_attention_heads * config.head_dim // 2)
               for n_in, _ in shapes)


def test_link_measurement_against_an_echo_peer():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = threading.Thread(target=serve_echo, args=(port, 17, "127.0.0.1"), daemon=True)
    server.start()
    link = measure_link(f"tcp://127.0.0.1:{port}", 10)
    server.join(timeout=5)
    assert 0 < link["latency_ms"] < 50 and link["bandwidth_mbit"] > 0


def test_int4_prefill_is_planned_with_the_devices_int4_kernel():
    """Where int4 rows go through the one-row C kernel one at a time (AVX2, NEON), a prompt
    costs a weight read per token; AVX-512's torch kernel (and an older profile) keep the
    matmul rate."""
    config = preset_config("llama2-7b")

    def ttft(paths):
        profile = {**LAPTOP, **({"kernel_paths": {"i4": paths}} if paths else {})}
        return plan_cluster(config, _spec({"nodes": [{"profile": profile}]}), "int4",
                            context=1024).ttft_s

    assert ttft("avx2") == ttft("neon") > ttft("avx512-vnni") == ttft(None) == ttft("torch")
