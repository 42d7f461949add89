"""The cluster file: the examples parse, defaults are right, and every mistake is a clear error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.paths import CONFIGS

from edgetp.config.cluster import load_cluster_config, parse_cluster_config
from edgetp.config.links import BUILTIN_PROFILES, load_profiles
from edgetp.core.errors import ConfigError

BASE: dict[str, Any] = {
    "model": "models/demo",
    "master": {"address": "192.168.1.10", "port": 6000},
    "nodes": [
        {"name": "laptop", "address": "192.168.1.10", "shard_dir": "~/edgetp/rank-0",
         "memory_budget": "6GiB", "threads": 4, "share": 2, "link": "home-wifi"},
        {"name": "pi", "address": "192.168.1.12", "ssh": "pi@192.168.1.12:2222",
         "shard_dir": "~/edgetp/rank-1", "memory_budget": "1.5GiB", "link": "gigabit"},
    ],
}


def parse(data: Any, source: str = "c.yaml") -> Any:
    return parse_cluster_config(data, source, Path("/configs"), "c")


def with_changes(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def with_node_change(index: int, **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            data["nodes"][index].pop(key, None)
        else:
            data["nodes"][index][key] = value
    return data


@pytest.mark.parametrize("name", ["home-4node.yaml", "local-testbed.yaml", "docker-testbed.yaml"])
def test_example_configs_parse(name: str) -> None:
    config = load_cluster_config(CONFIGS / name)
    assert len(config.nodes) >= 3
    assert config.nodes[0].rank == 0 and config.nodes[0].is_local
    assert all(config.link_profile(n) is not None for n in config.nodes)


def test_home_example_has_ssh_workers_and_curve() -> None:
    config = load_cluster_config(CONFIGS / "home-4node.yaml")
    assert [n.ssh is not None for n in config.nodes] == [False, True, True, True]
    assert config.nodes[3].ssh_host == "me@192.168.1.13" and config.nodes[3].ssh_port == 2222
    assert config.security.curve and config.security.keys_dir
    assert config.shares == (2.0, 2.0, 1.0, 1.0)
    assert config.master.url == "tcp://192.168.1.10:5555"


def test_links_file_equals_the_builtin_profiles() -> None:
    assert load_profiles(CONFIGS / "links.yaml") == BUILTIN_PROFILES
    tpi = BUILTIN_PROFILES["tpi-llm"]
    assert (tpi.latency_ms, tpi.bandwidth_mbit) == (1.0, 300.0) and "8 GB" in tpi.description
    wifi = BUILTIN_PROFILES["home-wifi"]
    assert (wifi.latency_ms, wifi.jitter_ms, wifi.bandwidth_mbit) == (5.0, 2.0, 100.0)
    gig = BUILTIN_PROFILES["gigabit"]
    assert (gig.latency_ms, gig.bandwidth_mbit) == (0.2, 1000.0)


def test_values_and_defaults() -> None:
    config = parse(BASE)
    assert config.name == "c"
    laptop, pi = config.nodes
    assert laptop.memory_budget == 6 * 2**30 and pi.memory_budget == int(1.5 * 2**30)
    assert (laptop.threads, pi.threads) == (4, None)
    assert config.shares == (2.0, 1.0)
    assert pi.ssh_host == "pi@192.168.1.12" and pi.ssh_port == 2222 and laptop.ssh is None
    assert config.master.bind == "tcp://0.0.0.0:6000"
    assert (config.allreduce, config.wire_dtype, config.security.curve) == ("star", "f32", False)
    assert pi.python == "python3" and pi.cache_dir == "~/.cache/edgetp"
    assert pi.data_port is None
    assert parse(with_node_change(1, data_port=5601)).nodes[1].data_port == 5601
    assert config.link_profile(pi) == BUILTIN_PROFILES["gigabit"]
    assert config.local_path("models/demo") == Path("/configs/models/demo")


def test_empty_master_and_security_sections_mean_the_defaults() -> None:
    config = parse(with_changes(master=None, security=None))
    assert config.master.url == "tcp://192.168.1.10:5555" and not config.security.curve


def test_master_address_defaults_to_node_0_and_top_level_shares() -> None:
    data = with_changes(master={"port": 7000}, shares=[3, 1])
    for node in data["nodes"]:
        node.pop("share", None)
    config = parse(data)
    assert config.master.url == "tcp://192.168.1.10:7000"
    assert config.shares == (3.0, 1.0)


def test_inline_link_profiles_extend_the_builtins() -> None:
    data = with_changes(link_profiles={"slow": {"latency_ms": 20, "bandwidth_mbit": 10}})
    data["nodes"][1]["link"] = "slow"
    config = parse(data)
    assert config.link_profile(config.nodes[1]).latency_ms == 20
    assert "tpi-llm" in config.link_profiles


def test_link_profiles_from_a_file_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "mylinks.yaml").write_text(yaml.safe_dump(
        {"lan": {"latency_ms": 0.5, "bandwidth_mbit": 500}}))
    data = with_changes(link_profiles="mylinks.yaml")
    data["nodes"][0]["link"] = "lan"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    config = load_cluster_config(tmp_path / "c.yaml")
    assert config.link_profile(config.nodes[0]).bandwidth_mbit == 500


ERRORS = {
    "unknown top key": (with_changes(modle="x"), ["unknown key 'modle'", "did you mean 'model'"]),
    "unknown node key": (with_node_change(1, memroy_budget="1GiB"),
                         ["nodes[1]", "unknown key 'memroy_budget'", "'memory_budget'"]),
    "unknown master key": (with_changes(master={"adress": "1.2.3.4"}),
                           ["master", "unknown key 'adress'"]),
    "unknown security key": (with_changes(security={"curve": False, "key_dir": "k"}),
                             ["security", "'key_dir'"]),
    "unknown profile key": (with_changes(link_profiles={"x": {"latency": 1}}),
                            ["link_profiles: x", "'latency'"]),
    "duplicate name": (with_node_change(1, name="laptop"),
                       ["nodes[1] and nodes[0]", "same name 'laptop'"]),
    "duplicate address": (with_node_change(1, address="192.168.1.10"),
                          ["nodes[1] and nodes[0]", "same address '192.168.1.10'"]),
    "shares count": (with_node_change(0, share=None) | {"shares": [1, 1, 1]},
                     ["shares has 3 values but there are 2 nodes"]),
    "shares twice": (with_changes(shares=[1, 1]), ["not both"]),
    "bad share": (with_node_change(0, share=0), ["nodes[0] (laptop).share", "> 0"]),
    "memory budget": (with_node_change(1, memory_budget="1.5 gigs"),
                      ["nodes[1] (pi): memory_budget", "cannot read '1.5 gigs' as a size"]),
    "memory limit": (with_node_change(1, memory_limit=[1]), ["memory_limit", "size"]),
    "missing shard_dir": (with_node_change(1, shard_dir=None),
                          ["nodes[1] (pi)", "'shard_dir' is required", "rank-1"]),
    "missing address": (with_node_change(0, address=None), ["'address' is required"]),
    "address with port": (with_node_change(1, address="10.0.0.2:5555"), ["without tcp://"]),
    "unknown link": (with_node_change(1, link="5g"), ["unknown link profile '5g'", "home-wifi"]),
    "bad ssh": (with_node_change(1, ssh="pi@host name"), ["user@host"]),
    "ssh config option": (with_node_change(1, ssh="-Fconfig"), ["nodes[1] (pi).ssh", "option"]),
    "ssh host option": (with_node_change(1, ssh="x@-oLocalCommand"), ["'-'", "option"]),
    "ssh user option": (with_node_change(1, ssh="-oProxyCommand@host"), ["option", "user@host"]),
    "bad threads": (with_node_change(0, threads=0), ["threads", ">= 1"]),
    "bad port": (with_changes(master={"port": 70000}), ["not a TCP port"]),
    "bad data port": (with_node_change(1, data_port=70000), ["data_port", "not a TCP port"]),
    "bad bind": (with_changes(master={"port": 1, "bind": "0.0.0.0:1"}), ["tcp://"]),
    "bad allreduce": (with_changes(allreduce="tree"), ["allreduce must be one of star, ring"]),
    "bad wire": (with_changes(wire_dtype="int4"), ["wire_dtype"]),
    "curve without keys": (with_changes(security={"curve": True}), ["keys_dir"]),
    "curve not bool": (with_changes(security={"curve": "yes"}), ["true or false"]),
    "no nodes": (with_changes(nodes=[]), ["non-empty list"]),
    "node not a mapping": (with_changes(nodes=["laptop"]), ["nodes[0]", "mapping"]),
    "no model": ({k: v for k, v in BASE.items() if k != "model"}, ["'model' is required"]),
    "not a mapping": (["nodes"], ["must be a mapping"]),
    "bad name": (with_changes(name="my cluster"), ["name 'my cluster'"]),
    "ssh options": (with_changes(ssh_options="-i key"), ["list of strings"]),
    "negative latency": (with_changes(link_profiles={"x": {"latency_ms": -1}}), [">= 0"]),
    "count when launching": (with_node_change(1, count=3), ["count is for planning files"]),
    "bad count": (with_node_change(1, count=0), ["count", ">= 1"]),
    "profile not a mapping": (with_node_change(1, profile=[3]), ["profile", "edgetp probe"]),
    "bad inline link": (with_node_change(1, link={"latency_ms": 1, "rate": 3}),
                        ["nodes[1] (pi).link", "'rate'"]),
    "unknown default link": (with_changes(link="5g"), ["c.yaml: link", "unknown link profile"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_validation_errors_say_what_and_where(case: str) -> None:
    data, fragments = ERRORS[case]
    with pytest.raises(ConfigError) as info:
        parse(data)
    message = str(info.value)
    assert message.startswith("c.yaml"), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_cluster_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("nodes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_config(tmp_path / "bad.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(with_changes(link_profiles="nope.yaml")))
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_cluster_config(tmp_path / "c.yaml")


def test_planning_files_need_no_addresses_and_expand_counts() -> None:
    data = {"link": {"latency_ms": 1, "bandwidth_mbit": 300},
            "nodes": [{"name": "desk", "profile": "desk.json"},
                      {"name": "pi", "count": 3, "profile": {"mem_bw_gbs": 8}, "link": "gigabit",
                       "memory_budget": "3GiB"}]}
    config = parse_cluster_config(data, "plan.yaml", Path("/configs"), planning=True)
    assert [n.name for n in config.nodes] == ["desk", "pi-0", "pi-1", "pi-2"]
    assert [n.rank for n in config.nodes] == [0, 1, 2, 3]
    assert config.nodes[0].profile == "desk.json" and config.nodes[3].profile == {"mem_bw_gbs": 8}
    assert config.nodes[3].memory_budget == 3 * 2**30
    assert config.link_profile(config.nodes[0]).bandwidth_mbit == 300  # the top-level link
    assert config.link_profile(config.nodes[2]) == BUILTIN_PROFILES["gigabit"]
    with pytest.raises(ConfigError, match="'model' is required"):
        parse_cluster_config(data, "plan.yaml")  # the same file cannot be launched


def test_a_launch_file_takes_profiles_and_int8_wire() -> None:
    config = parse(with_node_change(1, profile="pi.json") | {"wire_dtype": "int8"})
    assert config.nodes[1].profile == "pi.json" and config.nodes[0].profile is None
    assert config.wire_dtype == "int8"
