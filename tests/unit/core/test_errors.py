"""The error base: every kind a user meets is an EdgetpError and keeps its builtin base."""

from __future__ import annotations

import pickle

import pytest

from edgetp.core.errors import (
    ClusterError,
    ConfigError,
    EdgetpError,
    ModelError,
    SecurityError,
    ShardError,
)


@pytest.mark.parametrize("kind, builtin", [
    (ConfigError, ValueError), (ModelError, ValueError), (ShardError, ValueError),
    (SecurityError, ValueError), (ClusterError, RuntimeError)])
def test_each_kind_is_an_edgetp_error_and_keeps_its_builtin_base(kind, builtin) -> None:
    error = kind("it broke")
    assert isinstance(error, EdgetpError) and isinstance(error, builtin)
    assert str(error) == "it broke" and error.fix == ""


def test_the_fix_follows_the_message_and_survives_pickling() -> None:
    error = ShardError("rank-1/manifest.json not found", fix="split the model again")
    assert str(error) == "rank-1/manifest.json not found; split the model again"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ShardError and (copy.message, copy.fix) == (error.message, error.fix)


def test_the_errors_of_the_layers_above_are_edgetp_errors() -> None:
    from edgetp.model.checkpoint import CheckpointError
    from edgetp.model.tokenizer import TokenizerError
    from edgetp.net.security import SecurityError as NetSecurityError
    from edgetp.net.transport import ClusterError as TransportClusterError
    from edgetp.net.transport import HandshakeRefused
    from edgetp.net.wire import WireError
    from edgetp.ops.launch import LaunchError
    from edgetp.parallel.window import WindowError
    from edgetp.serve.chat import ChatError
    from edgetp.shard.manifest import ShardError as ManifestShardError
    from edgetp.shard.plan import PlanError

    assert NetSecurityError is SecurityError and ManifestShardError is ShardError
    assert TransportClusterError is ClusterError
    assert issubclass(HandshakeRefused, ClusterError) and issubclass(LaunchError, ClusterError)
    assert issubclass(CheckpointError, ModelError) and issubclass(TokenizerError, ModelError)
    assert issubclass(PlanError, ConfigError)
    for kind, builtin in ((WireError, ValueError), (WindowError, RuntimeError),
                          (ChatError, RuntimeError)):
        assert issubclass(kind, EdgetpError) and issubclass(kind, builtin)
