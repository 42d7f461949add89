"""The probe: what one device can do, measured for the planner (``edgetp probe``).

It writes a device profile (the keys and their validation are :mod:`edgetp.config.device`'s):

- ``matvec_gbs``: weight bytes per second of matrix-vector products ``[1, d] x [d, k]``, per
  dtype. Batch-1 decoding is memory-bound, so this (not FLOP/s) sets the decode speed.
  Measured cycling through more weight copies than any cache holds.
- ``flops_gflops``: a prefill-like ``[128, d] x [d, k]`` matmul, per dtype (prefill speed).
- ``mem_bw_gbs``: a streaming sum over a large tensor (KV cache reads).
- ``disk_bw_mbs``: reads from the shard directory's disk with the page cache dropped
  (``posix_fadvise(DONTNEED)``). A file written for the test is read sequentially and deleted
  (``disk_seq_mbs``); when ``--shard-dir`` holds a split, its tensors are then read the way the
  window streams them (one read per tensor, each range dropped after), and that figure is the
  profile's, since on some disks it is several times lower.
- ``layer_overhead_us`` / ``step_overhead_us``: Python and dispatch time of one decoder layer
  and of one step (embedding, head, sampling) at a size where bytes do not matter.
- ``msg_overhead_us``: one message's software cost (edgetp's wire encoding and decoding at
  both ends plus ZeroMQ), half the round trip of a ``[1, 1024]`` float32 message over loopback
  TCP to an echo that decodes it and encodes the reply, as a worker would.
- ``data_msg_overhead_us``: the same for an allreduce message over the data link
  (``edgetp.net.datalink``: a plain TCP socket, fixed header) to an echo in another process,
  which the star allreduce uses (with CURVE keys sealed, a few microseconds more:
  edgetp.net.sealedlink).
- ``runtime_rss``: the resident memory of a Python process that has imported torch and edgetp,
  before any weight is loaded; ``free_memory``: what the OS reports as available.

Link figures (``link``: round trip, one-way latency, bandwidth) need a peer: run
``edgetp probe --serve-echo PORT`` on the master's machine and ``edgetp probe --master
tcp://MASTER:PORT`` on each device. Without ``--master`` the link is not measured.

The parts: :mod:`~edgetp.perf.probe.compute` (memory, products, overheads),
:mod:`~edgetp.perf.probe.disk`, :mod:`~edgetp.perf.probe.link` (messages and links) and
:mod:`~edgetp.perf.probe.profile` (the whole probe and its summary).
"""

from __future__ import annotations

from edgetp.perf.probe.compute import (
    matvec_shapes,
    measure_matmul,
    measure_matvec,
    measure_memory_bandwidth,
    measure_overheads,
)
from edgetp.perf.probe.disk import measure_disk, measure_window_reads
from edgetp.perf.probe.link import measure_data_link, measure_link, measure_loopback, serve_echo
from edgetp.perf.probe.profile import describe_profile, probe_device

__all__ = [
    "describe_profile", "matvec_shapes", "measure_data_link", "measure_disk", "measure_link",
    "measure_loopback", "measure_matmul", "measure_matvec", "measure_memory_bandwidth",
    "measure_overheads", "measure_window_reads", "probe_device", "serve_echo",
]
