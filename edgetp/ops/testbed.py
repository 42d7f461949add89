"""Emulated home clusters on one machine: the network-namespace testbed and the Docker compose file.

``edgetp testbed --nodes 3 --profile home-wifi --memory-budget 256MiB MODEL_DIR`` (root, Linux):

* a bridge ``etpbr<ID>``; per node k a namespace ``edgetp-<ID>-k`` joined to it by a veth pair
  (``etpv<ID>h<k>`` on the bridge, ``eth0`` inside) with the node's address (default
  ``10.77.0.(k+1)/24``; the bridge has no address, so nothing leaves the namespaces), and a
  cgroup ``edgetp-testbed-<ID>/node-k`` (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)
  holding the node's ``memory_limit``;
* every node process starts as ``sh -c 'echo $$ > CG/cgroup.procs && exec "$@"' CG ip netns
  exec NS docker/entrypoint.sh ROLE ...`` (the cgroup is joined first: ``ip netns exec``
  remounts /sys): the Docker testbed's entrypoint, which shapes ``eth0`` with the node's link
  profile (:mod:`edgetp.ops.linkemu`) and execs edgetp;
* node 0 runs ``edgetp testbed --master-role SPEC``: it waits for the workers, generates the
  prompt greedily, benches a fixed workload into a report (the ``edgetp bench`` machinery) and
  shuts the workers down; the testbed then writes ``testbed.json`` and ``testbed.md``.

Everything created is recorded as it is created and removed on exit, on errors and on
SIGINT/SIGTERM/SIGHUP; ``edgetp testbed --cleanup`` removes leftovers by their names.
:func:`docker_compose` renders ``docker/compose.yaml`` from a cluster file (same entrypoint).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetp.config.cluster import ClusterConfig, NodeConfig, parse_cluster_config
from edgetp.core import settings
from edgetp.core.errors import ClusterError, ConfigError
from edgetp.core.files import read_json
from edgetp.core.settings import ENV_DELAY, ENV_DESCRIPTION, ENV_JITTER, ENV_PROFILE
from edgetp.core.units import format_bytes

if TYPE_CHECKING:
    from edgetp.runtime.master import Master

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
LINK_NAMES = re.compile(r"^etp(br|v)[0-9a-f]{4}")
NS_NAMES = re.compile(r"^edgetp-[0-9a-f]{4}-\d+$")
CGROUP_NAMES = re.compile(r"^edgetp-testbed-[0-9a-f]{4}$")
RUNTIME_OVERHEAD = int(1.5 * 2**30)  # python + torch beside the budget, for the default limit
Log = Callable[[str], None]


class TestbedError(ClusterError):
    """The testbed cannot run here, or a node failed; the message says which and why."""


@dataclass
class TestbedRun:
    config: ClusterConfig
    out_dir: Path
    prompt: str = "count by 3 : 5"
    max_new_tokens: int = 64
    bench: bool = True
    bench_tokens: int = 16  # prompt tokens and generated tokens of the benchmark
    bench_repeat: int = 2
    join_timeout_s: float = 180.0
    run_timeout_s: float = 900.0


def flags_config(model_dir: Path, nodes: int, profile: str | None, memory_budget: str | None,
                 memory_limit: str | None, profiles_file: Path | None, out_dir: Path,
                 port: int = 5555) -> ClusterConfig:
    """The cluster of ``edgetp testbed --nodes N ...`` (without ``--config``)."""
    if not 2 <= nodes <= 200:
        raise ConfigError(f"--nodes {nodes}: the testbed runs 2 to 200 nodes")
    split = out_dir / "split"
    node_list = []
    for k in range(nodes):
        node: dict[str, Any] = {"name": f"node-{k}", "address": f"10.77.0.{k + 1}",
                                "shard_dir": str(split / f"rank-{k}"), "threads": 1}
        for key, value in (("memory_budget", memory_budget), ("memory_limit", memory_limit),
                           ("link", profile)):
            if value is not None:
                node[key] = value
        node_list.append(node)
    data: dict[str, Any] = {"name": "testbed", "model": str(model_dir.resolve()),
                            "split_dir": str(split), "master": {"port": port},
                            "nodes": node_list}
    if profiles_file is not None:
        data["link_profiles"] = str(profiles_file.resolve())
    return parse_cluster_config(data, "edgetp testbed", Path.cwd(), "testbed")


# -- what the testbed creates, and removing it -------------------------------------------------

def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if check and result.returncode != 0:
        raise TestbedError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result


@dataclass
class Resources:
    """Everything one testbed created, removed in reverse by :meth:`cleanup` (idempotent)."""

    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)  # children before parents on removal
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cleanup(self, log: Log) -> None:
        for proc in self.processes:
            _stop_process(proc)
        for ns in self.namespaces:
            _kill_namespace_processes(ns)
        for cgroup in reversed(self.cgroups):
            _remove_cgroup(cgroup, log)
        for ns in reversed(self.namespaces):
            if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
                log(f"removed namespace {ns}")
        for link in reversed(self.links):
            if _run(["ip", "link", "del", link], check=False).returncode == 0:
                log(f"removed link {link}")
        self.processes.clear()
        self.namespaces.clear()
        self.cgroups.clear()
        self.links.clear()


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _kill_namespace_processes(ns: str) -> None:
    result = _run(["ip", "netns", "pids", ns], check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove_cgroup(cgroup: Path, log: Log) -> None:
    if not cgroup.is_dir():
        return
    for child in sorted((p for p in cgroup.iterdir() if p.is_dir()), reverse=True):
        _remove_cgroup(child, log)
    for _ in range(50):
        procs = (cgroup / "cgroup.procs").read_text().split() if (
            cgroup / "cgroup.procs").exists() else []
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            cgroup.rmdir()
            log(f"removed cgroup {cgroup}")
            return
        except OSError:
            time.sleep(0.1)
    log(f"warning: could not remove cgroup {cgroup}")


def cleanup_leftovers(log: Log) -> int:
    """Remove every testbed namespace, link and cgroup by name (``edgetp testbed --cleanup``)."""
    _require_root()
    res = Resources()
    res.namespaces = [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout
                      .splitlines() if line.split() and NS_NAMES.match(line.split()[0])]
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if LINK_NAMES.match(name):
            res.links.append(name)
    for root in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        if root.is_dir():
            res.cgroups += [p for p in root.iterdir() if CGROUP_NAMES.match(p.name)]
    count = len(res.namespaces) + len(res.links) + len(res.cgroups)
    res.cleanup(log)
    return count


# -- building it -------------------------------------------------------------------------------

def _require_root() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        raise TestbedError("the namespace testbed needs root on Linux (network namespaces, "
                           "tc and cgroups); run it with sudo, or use docker/compose.yaml")
    if shutil.which("ip") is None:
        raise TestbedError("`ip` (iproute2) is missing: apt-get install iproute2")


def cgroup_kind() -> tuple[str, Path] | None:
    """("v1", /sys/fs/cgroup/memory) or ("v2", /sys/fs/cgroup), whichever has memory."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        return "v1", v1
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2", v2
    return None


def make_cgroup(kind: str, root: Path, parent_name: str, node: str, limit: int,
                res: Resources) -> Path:
    parent = root / parent_name
    if not parent.exists():
        parent.mkdir()
        res.cgroups.append(parent)
    if kind == "v2":
        for directory in (root, parent):
            with contextlib.suppress(OSError):
                (directory / "cgroup.subtree_control").write_text("+memory")
    cgroup = parent / node
    cgroup.mkdir()
    res.cgroups.append(cgroup)
    limit_file = "memory.limit_in_bytes" if kind == "v1" else "memory.max"
    (cgroup / limit_file).write_text(str(limit))
    swap = cgroup / ("memory.memsw.limit_in_bytes" if kind == "v1" else "memory.swap.max")
    with contextlib.suppress(OSError):  # no swapping around the limit, where swap accounting is on
        swap.write_text(str(limit) if kind == "v1" else "0")
    return cgroup


def cgroup_peak(kind: str, cgroup: Path) -> int | None:
    path = cgroup / ("memory.max_usage_in_bytes" if kind == "v1" else "memory.peak")
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def setup_network(tag: str, config: ClusterConfig, res: Resources) -> list[str]:
    """The bridge, and a namespace with its veth and address per node; the namespaces."""
    addresses = [ipaddress.ip_interface(f"{n.address}/24") for n in config.nodes]
    if len({a.network for a in addresses}) != 1:
        got = [n.address for n in config.nodes]
        raise ConfigError(f"{config.source}: the testbed needs every node address in one /24 "
                          f"(e.g. 10.77.0.1 ... 10.77.0.N), got {got}")
    bridge = f"etpbr{tag}"
    _run(["ip", "link", "add", bridge, "type", "bridge"])
    res.links.append(bridge)
    _run(["ip", "link", "set", bridge, "up"])
    namespaces = []
    for node, address in zip(config.nodes, addresses, strict=True):
        ns, host, peer = f"edgetp-{tag}-{node.rank}", f"etpv{tag}h{node.rank}", \
            f"etpv{tag}n{node.rank}"
        _run(["ip", "netns", "add", ns])
        res.namespaces.append(ns)
        _run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
        res.links.append(host)
        _run(["ip", "link", "set", host, "master", bridge, "up"])
        _run(["ip", "link", "set", peer, "netns", ns])
        _run(["ip", "-n", ns, "link", "set", peer, "name", "eth0"])
        _run(["ip", "-n", ns, "addr", "add", str(address), "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        namespaces.append(ns)
    return namespaces


def node_command(ns: str, cgroup: Path | None, args: list[str]) -> list[str]:
    """Join the cgroup, then exec the shared entrypoint (link profile, then edgetp) in ``ns``.

    The cgroup is joined *before* ``ip netns exec``, which remounts /sys for the namespace (the
    cgroup files are not visible inside); membership carries over the exec.
    """
    inner = 'echo $$ > "$0/cgroup.procs" && exec "$@"' if cgroup else 'exec "$@"'
    return ["sh", "-c", inner, str(cgroup or "sh"), "ip", "netns", "exec", ns, str(ENTRYPOINT),
            *args]


def _node_env(node: NodeConfig, profiles_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (ENV_DELAY, ENV_JITTER, ENV_DESCRIPTION, ENV_PROFILE)}
    env.update({"EDGETP_PYTHON": sys.executable, "EDGETP_LINK_PROFILES": str(profiles_file),
                "EDGETP_LINK_DEV": "eth0", "OMP_NUM_THREADS": str(node.threads or 1),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")]))})
    if node.link:
        env[ENV_PROFILE] = node.link
    return env


def _insecure_flag(command: str) -> list[str]:
    """``--insecure`` where the CLI has it: the testbed's links are private, not encrypted."""
    from edgetp.cli import main as cli

    params = {p.name for p in cli.commands[command].params}
    return ["--insecure"] if "insecure" in params else []


def _memory_limit(node: NodeConfig) -> int:
    if node.memory_limit:
        return node.memory_limit
    return (node.memory_budget + RUNTIME_OVERHEAD) if node.memory_budget else 4 * 2**30


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt like Ctrl-C, so the cleanup in ``finally`` runs."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    saved = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            saved[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    saved = {}
    with contextlib.suppress(ValueError):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- running it --------------------------------------------------------------------------------

def run_testbed(run: TestbedRun, log: Log) -> dict[str, Any]:
    """Build the testbed, run the cluster in it, write the reports, and remove everything."""
    _require_root()
    if not ENTRYPOINT.is_file():
        raise TestbedError(f"{ENTRYPOINT} not found: the testbed runs from a source checkout")
    config, out = run.config, run.out_dir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    split = _split(config, log)
    profiles_file = out / "links.yaml"
    _write_profiles(config, profiles_file)
    tag = secrets.token_hex(2)
    res = Resources()
    cgroups = cgroup_kind()
    if cgroups is None:
        log("warning: no cgroup memory controller: nodes run without a memory limit")
    with _signals_raise():
        try:
            namespaces = setup_network(tag, config, res)
            log(f"testbed {tag}: {len(namespaces)} namespaces on bridge etpbr{tag}")
            groups = [make_cgroup(*cgroups, f"edgetp-testbed-{tag}", f"node-{n.rank}",
                                  _memory_limit(n), res) if cgroups else None
                      for n in config.nodes]
            _start_workers(config, namespaces, groups, profiles_file, out, res)
            spec = _master_spec(run, split, namespaces, out)
            master = _start(config.nodes[0], namespaces[0], groups[0], profiles_file, out,
                            ["testbed", "--master-role", str(spec)], res)
            _wait(master, list(zip(config.workers, res.processes[:-1], strict=True)),
                  run.run_timeout_s, out)
            for proc in res.processes[:-1]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            peaks = [cgroup_peak(cgroups[0], g) if cgroups and g else None for g in groups]
            return _report(run, namespaces, peaks, out, log)
        finally:
            with _shielded():  # a second Ctrl-C must not cut the cleanup short
                res.cleanup(lambda line: None)
            log(f"testbed {tag}: removed its namespaces, links, cgroups and processes")


def _split(config: ClusterConfig, log: Log) -> Path:
    from edgetp.shard.split import split_checkpoint

    split = config.local_path(config.split_dir or "testbed-split")
    for node in config.nodes:
        if config.local_path(node.shard_dir).resolve() != (split / f"rank-{node.rank}").resolve():
            raise ConfigError(f"{config.source}: nodes[{node.rank}].shard_dir must be "
                              f"{split / f'rank-{node.rank}'} (the split_dir's rank-{node.rank})")
    shares = None if len(set(config.shares)) == 1 else config.shares
    log(f"splitting {config.model} for {len(config.nodes)} nodes into {split}")
    split_checkpoint(config.local_path(config.model), split, len(config.nodes), shares,
                     private_layers=config.private_layers)
    return split


def _write_profiles(config: ClusterConfig, path: Path) -> None:
    import yaml

    data = {name: {"latency_ms": p.latency_ms, "jitter_ms": p.jitter_ms,
                   "bandwidth_mbit": p.bandwidth_mbit, "description": p.description}
            for name, p in config.link_profiles.items()}
    for values in data.values():
        if values["bandwidth_mbit"] is None:
            del values["bandwidth_mbit"]
    path.write_text(yaml.safe_dump({"link_profiles": data}, sort_keys=False))


def _start(node: NodeConfig, ns: str, cgroup: Path | None, profiles_file: Path, out: Path,
           args: list[str], res: Resources) -> subprocess.Popen[bytes]:
    with (out / "logs" / f"{node.name}.log").open("wb") as log_file:
        proc = subprocess.Popen(node_command(ns, cgroup, args), env=_node_env(node, profiles_file),
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=str(REPO))
    res.processes.append(proc)
    return proc


def _start_workers(config: ClusterConfig, namespaces: list[str], groups: list[Path | None],
                   profiles_file: Path, out: Path, res: Resources) -> None:
    for node in config.workers:
        args = ["worker", "--shard", str(config.local_path(node.shard_dir)), "--master",
                config.master.url, "--timeout", f"{config.timeout_s:g}",
                *_insecure_flag("worker")]
        if node.memory_budget:
            args += ["--memory-budget", str(node.memory_budget)]
        _start(node, namespaces[node.rank], groups[node.rank], profiles_file, out, args, res)


def _master_spec(run: TestbedRun, split: Path, namespaces: list[str], out: Path) -> Path:
    c = run.config
    spec = {
        "rank0": str(split / "rank-0"), "bind": f"tcp://{c.nodes[0].address}:{c.master.port}",
        "wire_dtype": c.wire_dtype, "allreduce": c.allreduce, "timeout_s": c.timeout_s,
        "memory_budget": c.nodes[0].memory_budget, "prompt": run.prompt,
        "max_new_tokens": run.max_new_tokens, "join_timeout_s": run.join_timeout_s,
        "bench": run.bench, "bench_tokens": run.bench_tokens, "bench_repeat": run.bench_repeat,
        "model_name": Path(c.model).name, "out_dir": str(out),
        "hosts": {str(n.rank): f"{ns} ({n.address})"
                  for n, ns in zip(c.nodes, namespaces, strict=True)},
        "testbed": _describe_nodes(c),
    }
    path = out / "master-spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def _describe_nodes(config: ClusterConfig) -> list[dict[str, Any]]:
    return [{"rank": n.rank, "name": n.name, "address": n.address, "link": n.link,
             "link_profile": None if n.link is None else config.link_profiles[n.link].summary(),
             "memory_budget_bytes": n.memory_budget, "memory_limit_bytes": _memory_limit(n)}
            for n in config.nodes]


def _wait(master: subprocess.Popen[bytes], workers: list[tuple[NodeConfig, Any]],
          timeout_s: float, out: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while master.poll() is None:
        for node, proc in workers:  # status 0: the master told it to shut down (at the end)
            if proc.poll() is not None and proc.returncode != 0:
                log_path = out / "logs" / f"{node.name}.log"
                raise TestbedError(f"worker {node.rank} ({node.name}) exited with status "
                                   f"{proc.returncode}; its log ({log_path}) ends:\n"
                                   + _tail(log_path))
        if time.monotonic() > deadline:
            raise TestbedError(f"the master did not finish within {timeout_s:g} s")
        time.sleep(0.2)


def _tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def _report(run: TestbedRun, namespaces: list[str], peaks: list[int | None], out: Path,
            log: Log) -> dict[str, Any]:
    result_path = out / "result.json"
    if not result_path.is_file():
        raise TestbedError("the master wrote no result; its log ends:\n"
                           + _tail(out / "logs" / f"{run.config.nodes[0].name}.log"))
    result = read_json(result_path, "the master's result", TestbedError)
    nodes = _describe_nodes(run.config)
    for node, ns, peak in zip(nodes, namespaces, peaks, strict=True):
        node["namespace"] = ns
        node["cgroup_peak_bytes"] = peak
        node["emulation"] = _emulation_line(out / "logs" / f"{node['name']}.log")
    report = {"testbed": "network namespaces", "cluster": run.config.name, "nodes": nodes,
              **result}
    (out / "testbed.json").write_text(json.dumps(report, indent=1))
    (out / "testbed.md").write_text(testbed_markdown(report))
    if "error" in result:
        raise TestbedError(f"the master failed: {result['error']} (logs in {out}/logs)")
    log(f"wrote {out}/testbed.json and testbed.md" + (", bench report in bench/"
                                                      if "bench" in result else ""))
    return report


def _emulation_line(log_path: Path) -> str:
    for line in _tail(log_path, 200_000).splitlines():
        if line.startswith("edgetp.ops.linkemu: "):
            return line.removeprefix("edgetp.ops.linkemu: ")
    return "none"


def testbed_markdown(report: dict[str, Any]) -> str:
    lines = [f"# edgetp testbed ({report['testbed']}): {report['cluster']}", "",
             "| rank | node | namespace | address | link emulation in force | memory limit | "
             "peak memory (cgroup) |", "|---|---|---|---|---|---|---|"]
    for n in report["nodes"]:
        peak = n.get("cgroup_peak_bytes")
        lines.append(f"| {n['rank']} | {n['name']} | {n.get('namespace', '')} | {n['address']} "
                     f"| {n['emulation']} | {format_bytes(n['memory_limit_bytes'])} | "
                     f"{format_bytes(peak) if peak else '-'} |")
    gen = report.get("generation")
    if gen:
        lines += ["", f"prompt: `{report.get('prompt', '')}`", "",
                  f"output: `{gen['text']}`", "",
                  f"{gen['generated_tokens']} tokens, TTFT {gen['ttft_ms']:.1f} ms, "
                  f"{gen['ms_per_token']:.2f} ms/token"]
    bench = report.get("bench")
    if bench:
        lines += ["", f"bench ({bench['workload']}): {bench['ms_per_token']:.2f} ms/token mean, "
                  f"report in bench/report.md"]
    if "error" in report:
        lines += ["", f"error: {report['error']}"]
    return "\n".join(lines) + "\n"


# -- the master's side (inside namespace 0) ----------------------------------------------------

def master_role(spec_path: Path) -> int:
    """Node 0 of the testbed: wait, generate, bench, shut the workers down, write result.json."""
    from edgetp.config.generation import GenerationConfig, SamplingConfig
    from edgetp.runtime.master import Master, Prompt

    settings.configure_logging()
    spec = read_json(spec_path, "testbed spec")
    out = Path(spec["out_dir"])
    result: dict[str, Any] = {"prompt": spec["prompt"],
                              "master_emulation": settings.link_emulation()}
    master = Master.cluster(spec["rank0"], spec["bind"], "float32", None, spec["wire_dtype"],
                            spec["timeout_s"], memory_budget=spec["memory_budget"],
                            allreduce=spec["allreduce"])
    try:
        master.wait_for_workers(spec["join_timeout_s"])
        gen = master.generate(Prompt(spec["prompt"]), SamplingConfig(),
                              GenerationConfig(max_new_tokens=spec["max_new_tokens"]))
        result["generation"] = gen.to_json()
        if spec["bench"]:
            result["bench"] = _bench(master, spec, out / "bench")
    except Exception as exc:  # noqa: BLE001 - reported in result.json and the exit status
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        master.close(shutdown_workers=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 1 if "error" in result else 0


def _bench(master: Master, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The ``edgetp bench`` workload and report, on this testbed's cluster."""
    from edgetp.perf import bench

    tokens, budget = spec["bench_tokens"], spec["memory_budget"]
    settings = bench.BenchSettings(spec["model_name"], master.n_ranks, None, tokens, tokens,
                                   spec["bench_repeat"], 1, budget and _budget_text(budget),
                                   spec["wire_dtype"],
                                   timeout_s=spec["timeout_s"], allreduce=spec["allreduce"])
    hosts = {int(rank): host for rank, host in spec["hosts"].items()}
    testbed = {"kind": "network namespaces", "nodes": spec["testbed"]}
    report, nodes = bench.measure(master, settings, budget, hosts, {"testbed": testbed})
    out.mkdir(parents=True, exist_ok=True)
    bench.write_reports(report, nodes, hosts, out)
    return {"workload": f"{tokens} prompt + {tokens} generated tokens x {spec['bench_repeat']}",
            "ms_per_token": report["summary"]["decode_ms_per_token"]["mean"],
            "link_emulation": report["settings"]["link_emulation"], "report_dir": str(out)}


# -- the Docker testbed ------------------------------------------------------------------------

def _compose_size(n: int) -> str:
    for unit, scale in (("g", 2**30), ("m", 2**20)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _budget_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def docker_compose(config: ClusterConfig, api_port: int = 8000) -> dict[str, Any]:
    """``docker/compose.yaml`` for a cluster file (node 0 serves the API on ``api_port``)."""
    subnet = ipaddress.ip_interface(f"{config.nodes[0].address}/24").network
    services: dict[str, Any] = {}
    for node in config.nodes:
        if node.rank == 0:
            args = ["serve", "--shards", node.shard_dir, "--bind",
                    f"tcp://0.0.0.0:{config.master.port}", "--host", "0.0.0.0", "--port",
                    str(api_port), *_insecure_flag("serve")]
        else:
            args = ["worker", "--shard", node.shard_dir, "--master", config.master.url,
                    *_insecure_flag("worker")]
        args += ["--timeout", f"{config.timeout_s:g}"]
        if node.memory_budget:
            args += ["--memory-budget", _budget_text(node.memory_budget)]
        env = {"EDGETP_LINK_DEV": "eth0", "OMP_NUM_THREADS": str(node.threads or 1)}
        if node.link:
            env[ENV_PROFILE] = f"${{{ENV_PROFILE}:-{node.link}}}"
        service: dict[str, Any] = {
            "image": "edgetp:local",  # every service builds it (one build, cached), none pulls
            "build": {"context": "..", "dockerfile": "docker/Dockerfile"},
            "hostname": node.name, "cap_add": ["NET_ADMIN"],
            "environment": env, "volumes": ["${EDGETP_SHARDS:-./shards}:/shards:ro"],
            "mem_limit": _compose_size(_memory_limit(node)), "cpus": float(node.threads or 1),
            "networks": {"edgetp": {"ipv4_address": node.address}}, "command": args}
        if node.rank == 0:
            service["ports"] = [f"127.0.0.1:{api_port}:{api_port}"]
        else:
            service["depends_on"] = [config.nodes[0].name]
        services[node.name] = service
    return {"name": "edgetp-testbed", "services": services,
            "networks": {"edgetp": {"ipam": {"config": [{"subnet": str(subnet)}]}}}}


def compose_text(config: ClusterConfig, api_port: int = 8000) -> str:
    import yaml

    header = (f"# Generated from {config.source} by\n#   edgetp testbed --compose {config.source}\n"
              "# tests/test_testbed.py checks that the two agree. Usage: docker/README.md\n")
    return header + yaml.safe_dump(docker_compose(config, api_port), sort_keys=False, width=100)
