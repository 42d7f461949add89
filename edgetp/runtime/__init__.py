"""The node roles and the generation loop: what runs a model, alone or as a cluster.

Owns the master (:mod:`.master`: tokenizer, sampling settings and the engine over a local or
cluster runner; the only node that sees text), the worker (:mod:`.worker`: one rank's shard
serving the master's steps, reconnecting when the master is lost), the prefill/decode loop
(:mod:`.engine`), and a whole cluster on one machine (:mod:`.local`: ``--nodes N``, the demo,
the tests), whose workers exit with their master (:mod:`.lifeline`).

May import: edgetp.parallel and edgetp.net (it wires the parallel model to the network), and
everything below them (shard, model, kernels, config, core). Never perf, serve, ops or cli:
they drive the runtime, through the methods the master offers.
"""
