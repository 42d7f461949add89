"""A node under a memory budget gives freed activations back to the kernel; a node without
one keeps them for the next layer's.

The 80-layer Llama 2 70B benchmark's master was killed by its 3.1 GB cgroup during its first
prefill: glibc raised its mmap threshold after the first freed activation, and from then on
each layer's [T, 8192] activations came from the heap, where small allocations that outlived
them kept the memory (1.3 MiB per layer, 100 MiB more at the head; ``edgetp.core.allocator``).
``load_rank`` with a budget now fixes the threshold.

Each test runs a fresh process (malloc's state is per process): it loads rank 0 of a tiny
split through ``load_rank``, then frees 1 MiB tensors (the size of a 32-row activation of a
70B model) each followed by a small allocation that outlives it, after one 16 MiB tensor (a
head chunk) was freed, and prints how much its anonymous memory grew: with a budget it must
not grow. Without one (glibc's default) it grows by about the tensors' bytes in some heap
layouts and not in others, so the control checks the cause instead: where glibc places such an
activation (its own mapping, or the heap). Without a budget, the loader keeps freed memory in
the heap (``keep_freed_memory``): a layer's worth of activations allocated and freed again
faults in few fresh pages, where glibc's own thresholds fault in most of them every layer.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
from helpers import processes

from edgetp.core.allocator import fix_mmap_threshold, mmap_threshold_fixed
from edgetp.shard.synthetic import write_synthetic_split

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
ROUNDS = 64  # 1 MiB tensors freed
CHILD = r"""
import sys, torch
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank

def anon():
    return [int(l.split()[1]) << 10 for l in open("/proc/self/status")
            if l.startswith("RssAnon:")][0]

budget = None if sys.argv[2] == "none" else int(sys.argv[2])
load_rank(sys.argv[1], SoloCommunicator(), torch.float32, 32, memory_budget=budget)
head_chunk = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del head_chunk  # glibc's dynamic threshold would rise to 16 MiB here
kept, before = [], anon()
for _ in range(int(sys.argv[3])):
    activation = torch.empty(1 << 20, dtype=torch.uint8).fill_(1)  # [32, 8192] float32
    kept.append(torch.empty(64, dtype=torch.uint8))  # outlives it (a step buffer, a span)
    del activation
print((anon() - before) / 2**20)
"""

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc on Linux (its mmap threshold, /proc/self/status)")


@pytest.fixture(scope="module")
def tiny_rank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heap") / "split"
    return write_synthetic_split(TINY, out, 1, dtype="int4").rank_dirs[0]


def heap_growth_mib(rank_dir: Path, budget: int | None) -> float:
    done = processes.run([sys.executable, "-c", CHILD, str(rank_dir),
                          "none" if budget is None else str(budget), str(ROUNDS)],
                         capture_output=True, text=True, timeout=120, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@glibc_linux
def test_a_budgeted_node_returns_freed_activations_to_the_kernel(tiny_rank):
    grown = heap_growth_mib(tiny_rank, budget=1 << 30)
    assert grown < 8, f"{grown:.0f} MiB kept after freeing {ROUNDS} 1 MiB activations"


PLACEMENT = r"""
import ctypes, sys, torch
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
budget = None if sys.argv[2] == "none" else int(sys.argv[2])
load_rank(sys.argv[1], SoloCommunicator(), torch.float32, 32, memory_budget=budget)
head_chunk = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del head_chunk
before = libc.mallinfo2().hblkhd
activation = torch.empty(1 << 20, dtype=torch.uint8).fill_(1)
print("mmap" if libc.mallinfo2().hblkhd - before >= 1 << 20 else "heap")
"""


def activation_placement(rank_dir: Path, budget: int | None) -> str:
    """Where a 1 MiB activation allocated after a freed 16 MiB head chunk comes from: its own
    mapping (``mmap``: freed, it goes back to the kernel) or the heap."""
    done = processes.run([sys.executable, "-c", PLACEMENT, str(rank_dir),
                          "none" if budget is None else str(budget)],
                         capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


@glibc_linux
def test_without_a_budget_glibc_puts_activations_on_the_heap(tiny_rank):
    """The control, deterministic where the growth itself is not (whether freed heap chunks
    are reused depends on the heap's layout): without a budget the next activations go on the
    heap, where they can be kept; with a budget they get mappings of their own."""
    assert activation_placement(tiny_rank, budget=None) == "heap"
    assert activation_placement(tiny_rank, budget=1 << 30) == "mmap"


@glibc_linux
def test_fixing_the_threshold_is_idempotent_and_remembered():
    assert fix_mmap_threshold() and fix_mmap_threshold()
    assert mmap_threshold_fixed() == 128 << 10


FAULTS = r"""
import resource, sys, torch
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank

if sys.argv[1] != "glibc":
    load_rank(sys.argv[1], SoloCommunicator(), torch.float32, 32)

def layer():  # a prefill layer's activations: several MiB each, two alive at a time
    alive = []
    for size in (2 << 20, 3 << 20, 6 << 20, 1 << 20, 6 << 20, 2 << 20):
        alive = [*alive[-1:], torch.empty(size, dtype=torch.uint8).fill_(1)]

for _ in range(3):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(rank_dir: Path | None) -> int:
    """Minor page faults of 10 layer-like rounds of allocations, after a node without a budget
    loaded ``rank_dir`` (None: a process on glibc's own thresholds)."""
    done = processes.run([sys.executable, "-c", FAULTS, str(rank_dir or "glibc")],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@glibc_linux
def test_without_a_budget_freed_activations_are_reused_not_faulted_in_again(tiny_rank):
    kept, glibc = page_faults(tiny_rank), page_faults(None)
    pages = 10 * (20 << 20) // 4096  # what the rounds allocate
    assert glibc > pages // 4, f"glibc's own thresholds faulted {glibc} pages only: the control"
    assert kept < glibc // 3, f"{kept} page faults with freed memory kept, {glibc} without"
