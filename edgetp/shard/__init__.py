"""Shards: how a checkpoint is cut for N ranks, and what a rank's directory holds.

Owns the plan (:mod:`.plan`: which heads, KV heads and MLP columns each rank owns, private
layers), the layout of a split directory (:mod:`.layout`: ``rank-K/`` directories and their
files), the manifest of a rank directory and its integrity checks (:mod:`.manifest`, with
:mod:`.stamps`: knowing a file unchanged by its stat, hashing it safely), the per-tensor
checksums every re-read from disk is checked against (:mod:`.checksums`), the quantized weight
formats (:mod:`.quant`, :mod:`.quantsplit`), what a split was made from, by content
(:mod:`.sources`: the fingerprint and the record that keeps a stale split unused), and the
streaming splitter (:mod:`.split`).

May import: edgetp.model (checkpoint reading), edgetp.kernels, edgetp.config, edgetp.core (and
torch, safetensors, xxhash). Never the layers above (parallel, net, runtime, ...). The plan,
layout and manifest are torch-free, so launch and planning tools read splits without loading
torch.
"""
