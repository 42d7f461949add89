"""The network between nodes: everything that crosses a socket.

Owns the wire format (:mod:`.wire`: versioned msgpack headers and raw tensor frames, checked
field by field), the activation codecs (:mod:`.codec`: f32, bf16, int8 rows), the ZeroMQ
transport (:mod:`.transport`: master and worker sockets, handshake, heartbeats, counters), the
star allreduce's TCP data link (:mod:`.datalink`; with keys sealed, :mod:`.sealedlink`, with
per-connection keys from :mod:`.linkkeys`), the collectives that implement
:class:`edgetp.parallel.comm.Communicator` (:mod:`.collectives`: star, in-process group;
:mod:`.ring`: the ring), CURVE keys and authentication (:mod:`.security`), and the testbeds'
send-side link delay (:mod:`.delay`).

May import: edgetp.core, edgetp.config, edgetp.kernels, edgetp.model, edgetp.shard (and torch,
ZeroMQ, msgpack, cryptography). Never edgetp.parallel (its peer layer: the parallel model
reaches the network only through the Communicator interface) nor anything above (runtime,
perf, serve, ops, cli).
It knows nothing of models: it moves tensors and messages.
"""
