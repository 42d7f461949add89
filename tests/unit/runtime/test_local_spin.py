"""A local cluster's nodes spin in their allreduces only when each has a core of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetp.core import settings
from edgetp.runtime import local
from edgetp.runtime.local import LocalCluster


@pytest.mark.parametrize(("cores", "nodes", "threads", "spins"), [
    (2, 2, None, True),   # one core each
    (2, 1, None, True),
    (2, 3, None, False),  # three nodes on two cores: a spinning node holds its peer's core
    (4, 2, 2, True),
    (4, 2, 3, False),     # --threads 3 on two nodes of a 4-core machine
])
def test_nodes_spin_unless_they_oversubscribe_the_cores(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: int, nodes: int,
        threads: int | None, spins: bool) -> None:
    monkeypatch.delenv(settings.ENV_SPIN, raising=False)
    monkeypatch.setattr(local, "usable_cores", lambda: cores)
    cluster = LocalCluster(tmp_path, nodes, threads=threads, split_dir=tmp_path / "split")
    assert cluster.spins is spins
    monkeypatch.setenv(settings.ENV_SPIN, "200")  # the user's word stands
    assert cluster.spins


def test_an_oversubscribed_clusters_workers_are_told_not_to_spin(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(settings.ENV_SPIN, raising=False)
    monkeypatch.setattr(local, "usable_cores", lambda: 2)
    started: list[dict[str, str]] = []
    monkeypatch.setattr(local, "spawn_tied", lambda command, env, **kw: started.append(env))
    monkeypatch.setattr(LocalCluster, "worker_command",
                        lambda self, rank: type("C", (), {"local_argv": lambda _: ["true"]})())
    for nodes, expected in ((3, "0"), (2, None)):
        started.clear()
        LocalCluster(tmp_path, nodes, split_dir=tmp_path / f"split{nodes}").start_worker(1)
        assert started[0].get(settings.ENV_SPIN) == expected
