"""The tensor-parallel model: one rank's share of the decoder, loaded and run within a budget.

Owns the parallel linears (:mod:`.linears`: column- and row-parallel, the rewrite of the
single-device model; :mod:`.qlinear`: the same over int8/int4 weights), the loader that builds
a rank from its shard directory alone (:mod:`.loader`), the sliding weight window that streams
blocks from disk under ``--memory-budget`` (:mod:`.window`, with :mod:`.pinning` choosing what
stays resident and :mod:`.blocks` reading and binding a block's bytes), and the one thing it
needs of its group, an allreduce (:mod:`.comm`: the Communicator interface).

May import: edgetp.shard, edgetp.model, edgetp.kernels, edgetp.config, edgetp.core (and torch,
safetensors). Never edgetp.net or any socket (an import-linter contract checks it): the
collectives that cross processes implement :class:`.comm.Communicator` from the net layer.
"""
