"""The ``edgetp`` command: one click group of thin commands over library calls.

Commands live with their kind: :mod:`~edgetp.cli.run` (generate, demo, chat),
:mod:`~edgetp.cli.cluster` (worker, master, keys, serve, launch, status, testbed),
:mod:`~edgetp.cli.model` (split, convert, synth-split) and :mod:`~edgetp.cli.perf` (bench,
report, plan, probe). torch and the heavy modules are imported inside the commands, so
``edgetp --help`` is instant. A mistake the user can fix prints one line and exits 1
(:mod:`edgetp.cli.errors`).
"""

from __future__ import annotations

import click

from edgetp.cli import cluster, model, perf, run
from edgetp.cli.errors import EdgetpGroup

COMMANDS = (run.generate, run.demo, run.chat, cluster.worker, cluster.master_command,
            cluster.keys, cluster.serve, cluster.launch, cluster.status, cluster.testbed,
            model.split, model.convert, model.synth_split, perf.bench, perf.report, perf.plan,
            perf.probe)


@click.group(cls=EdgetpGroup)
@click.version_option(package_name="edgetp")
def main() -> None:
    """edgetp: run a Llama-family model tensor-parallel across home devices."""


for command in COMMANDS:
    main.add_command(command)

if __name__ == "__main__":
    main()
