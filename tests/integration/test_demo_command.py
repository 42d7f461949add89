"""``edgetp demo``: a master and workers on loopback answer the demo prompt by the rule."""

from __future__ import annotations

from click.testing import CliRunner

from edgetp.cli.main import main
from edgetp.model.demo import expected_text


def test_demo_command_prints_the_right_answer() -> None:
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert expected_text(3, 5) in result.output
