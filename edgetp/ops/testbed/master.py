"""Node 0 of a testbed (``edgetp testbed --master-role SPEC``, in namespace 0 or the master's
container):
wait for the workers, generate the prompt greedily, bench a fixed workload into a report (the
``edgetp bench`` machinery), shut the workers down and write ``result.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetp.core import settings
from edgetp.core.files import read_json
from edgetp.runtime.commands import size_text

if TYPE_CHECKING:
    from edgetp.runtime.master import Master


def master_role(spec_path: Path) -> int:
    """Node 0 of the testbed: wait, generate, bench, shut the workers down, write result.json."""
    from edgetp.config.generation import GenerationConfig, SamplingConfig
    from edgetp.kernels.threads import use_threads
    from edgetp.runtime.master import Master, Prompt

    settings.configure_logging()
    spec = read_json(spec_path, "testbed spec")
    use_threads(spec.get("threads", 1))  # the node's CPUs (its container's, its cgroup's)
    out = Path(spec["out_dir"])
    result: dict[str, Any] = {"prompt": spec["prompt"],
                              "master_emulation": settings.link_emulation()}
    master = Master.cluster(spec["rank0"], spec["bind"], "float32", spec.get("max_seq_len"),
                            spec["wire_dtype"],
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
    new = spec.get("bench_new_tokens", tokens)
    settings = bench.BenchSettings(spec["model_name"], master.n_ranks, None, tokens, new,
                                   spec["bench_repeat"], spec.get("bench_warmup", 1),
                                   size_text(budget) if budget else None,
                                   spec["wire_dtype"],
                                   timeout_s=spec["timeout_s"], allreduce=spec["allreduce"])
    hosts = {int(rank): host for rank, host in spec["hosts"].items()}
    testbed = {"kind": spec.get("kind", "network namespaces"), "nodes": spec["testbed"]}
    report, nodes = bench.measure(master, settings, budget, hosts, {"testbed": testbed})
    out.mkdir(parents=True, exist_ok=True)
    bench.write_reports(report, nodes, hosts, out)
    return {"workload": f"{tokens} prompt + {new} generated tokens x {spec['bench_repeat']}",
            "ms_per_token": report["summary"]["decode_ms_per_token"]["mean"],
            "link_emulation": report["settings"]["link_emulation"], "report_dir": str(out)}
