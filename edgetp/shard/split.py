"""Streaming splitter: a Hugging Face checkpoint -> one shard directory per rank.

``OUT/rank-K/`` holds ``layer-XXX.safetensors`` (rank K's slice of layer XXX), on rank 0 also
``embed.safetensors``, ``head.safetensors`` and the tokenizer files, and ``manifest.json``.
Tensors are read one slice at a time, so the splitter's memory stays near two files' tensors
(one written while the next is converted) whatever the checkpoint's size. Files stay
standard safetensors.

Splitting again into the same directory checks the split against the model's files by content
(:mod:`edgetp.shard.sources`, one ``stat`` per file when nothing changed): the same model,
plan and dtype is a no-op (files copied for the master that changed are copied again);
anything else is an error unless ``force`` replaces the split. One splitter at a time works in
a directory (an exclusive lock on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgetp.config.model import ModelConfig, load_model_config
from edgetp.core.errors import ConfigError
from edgetp.core.units import format_bytes
from edgetp.model.checkpoint import Checkpoint, hf_name
from edgetp.shard.checksums import describe_written
from edgetp.shard.gguf_blocks import GGUFBlocks
from edgetp.shard.layout import layer_file, rank_dir, rank_dirs
from edgetp.shard.manifest import (
    FileEntry,
    Manifest,
    ShardError,
    read_manifest,
)
from edgetp.shard.plan import ShardPlan, TensorSlice, layer_slices, make_plan, master_tensors
from edgetp.shard.quant import QUANT_DTYPES, head_format
from edgetp.shard.quantsplit import TensorStore, shrunk_groups
from edgetp.shard.sources import (
    CONFIG_FILE,
    COPIED_FILES,
    SourceRecord,
    changed,
    check_sources,
    read_source_record,
    write_source_record,
)

TOKENIZER_FILES = (*COPIED_FILES, CONFIG_FILE)  # copied into rank-0 for the master
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_DTYPES = (*STORE_DTYPES, *QUANT_DTYPES)  # --dtype: float, or quantized (edgetp.shard.quant)
NATIVE = "native"  # --dtype native: the GGUF's own quantization (edgetp.shard.gguf_blocks)

ProgressFn = Callable[[str, int], None]  # (file just written, its size in bytes)


@dataclass(frozen=True)
class SplitResult:
    out_dir: Path
    rank_dirs: list[Path]
    skipped: bool  # True when an identical split was already there
    bytes_written: int
    rehashed: tuple[str, ...] = ()  # model files read and hashed (their stamp was new)
    recopied: tuple[str, ...] = ()  # files copied to rank-0 again (or removed) on a reuse
    seconds: float = 0.0  # how long the split took, from start to the last manifest
    bytes_read: int = 0  # the model's weight files, when they were split (not on a reuse)

    @property
    def rate(self) -> float:
        """Bytes of the model split per second (0 on a reuse)."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0


def split_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    n_ranks: int,
    shares: tuple[float, ...] | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    private_layers: int = 0,
    group_size: int = 32,
    head_dtype: str | None = None,
) -> SplitResult:
    """Split ``model_dir`` for ``n_ranks`` nodes into ``out_dir`` (see the module docstring).

    ``dtype`` int8/int4 quantizes the linear weights (``group_size``: int4's group); norms,
    the embedding and biases then keep the checkpoint's float dtype. ``native``: int4 (groups of
    32) or int8 for a model converted from a Q4_0/Q4_1 or Q8_0 GGUF, keeping its blocks, else
    the checkpoint's dtype. ``head_dtype`` is how the lm_head is stored
    (:func:`~edgetp.shard.quant.head_format`: by default int8 in an int4 split, else as the
    layers). Splitting again with the same model, plan and dtypes is a no-op; with anything
    different it is an error unless ``force``.
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_model_config(model_dir)
    checkpoint = Checkpoint(model_dir)
    plan = make_plan(config, n_ranks, shares, private_layers)
    if dtype == NATIVE:
        dtype = GGUFBlocks(model_dir).native_dtype()
        group_size = 32 if dtype == "int4" else group_size
    store_dtype = dtype or source_dtype(checkpoint)
    if store_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {store_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    float_name = store_dtype if store_dtype in STORE_DTYPES else source_dtype(checkpoint)
    head_fmt = head_format(store_dtype, head_dtype, float_name)
    store = TensorStore(store_dtype, STORE_DTYPES[float_name], group_size, checkpoint, config,
                        plan, head_fmt)
    dirs = [rank_dir(out_dir, r) for r in range(n_ranks)]
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        previous = read_source_record(dirs[0])
        sources = check_sources(model_dir, previous)
        stale = changed(previous.weights, sources.record.weights) if previous else []
        if _existing_split_matches(out_dir, sources.record.fingerprint, plan,
                                   (store_dtype, head_fmt), force, store.group_size, stale):
            recopied = _refresh_copies(model_dir, dirs[0], previous, sources.record)
            return SplitResult(out_dir, dirs, True, 0, sources.rehashed, recopied)
        writer = _SplitWriter(checkpoint, config, plan, store, progress)
        _write_split(model_dir, dirs, writer)
        record = _unchanged_since(model_dir, sources.record)
        for rank, directory in enumerate(dirs):
            Manifest(rank, record.fingerprint, store_dtype, config, plan, writer.files[rank],
                     store.group_size, head_fmt).write(directory)
        write_source_record(dirs[0], record)
    model_bytes = sum((model_dir / name).stat().st_size
                      for name in set(checkpoint.weight_map.values()))
    return SplitResult(out_dir, dirs, False, writer.bytes_written, sources.rehashed,
                       seconds=time.perf_counter() - started, bytes_read=model_bytes)


def _write_split(model_dir: Path, dirs: list[Path], writer: _SplitWriter) -> None:
    """Every rank's weight files, and rank-0's copies of the tokenizer files.

    Converting runs on one torch thread (in cache-sized chunks, :mod:`edgetp.shard.quant`)
    while a second thread writes and hashes the previous file: on a machine whose other cores
    are busy, torch's threads would wait for each other at every operation.
    """
    config, plan = writer.config, writer.plan
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
    with _torch_threads(1):
        try:
            for layer in range(config.num_hidden_layers):
                for rank in range(1 if plan.is_private(layer) else plan.n_ranks):
                    writer.write_layer(dirs[rank], rank, layer)
            for stem, names in master_tensors(config).items():
                writer.write_master_file(dirs[0], f"{stem}.safetensors", names)
        finally:
            writer.close()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            _copy(model_dir / name, dirs[0] / name)


def _unchanged_since(model_dir: Path, record: SourceRecord) -> SourceRecord:
    """``record`` (stamps refreshed) if the model's files still hold what it says, else raise:
    a file rewritten while the splitter read it may have given the split a mix of both."""
    now = check_sources(model_dir, record).record
    if moved := changed(record.weights, now.weights) + changed(record.copied, now.copied):
        raise ShardError(f"{', '.join(moved)} in {model_dir} changed while the model was being "
                         "split; split again once the model is saved")
    return now


def _refresh_copies(model_dir: Path, rank0: Path, previous: SourceRecord | None,
                    record: SourceRecord) -> tuple[str, ...]:
    """Bring rank-0's copies of the tokenizer files up to date; record the model's stamps."""
    differ = changed(previous.copied, record.copied) if previous else list(record.copied)
    todo = [name for name in COPIED_FILES  # changed, or a copy missing or left over
            if name in differ or (name in record.copied) != (rank0 / name).is_file()]
    for name in todo:
        if name in record.copied:
            _copy(model_dir / name, rank0 / name)
        else:
            (rank0 / name).unlink(missing_ok=True)
    if todo:
        record = _unchanged_since(model_dir, record)
    if record != previous:
        write_source_record(rank0, record)
    return tuple(todo)


def _copy(source: Path, target: Path) -> None:
    """Copy atomically: a master starting meanwhile reads the old file or the new one."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch's operations on ``count`` threads, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (where the filesystem offers ``flock``)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # e.g. NFS without lock support: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def source_dtype(checkpoint: Checkpoint) -> str:
    dtype = checkpoint.get(checkpoint.names[0]).dtype
    return {v: k for k, v in STORE_DTYPES.items()}.get(dtype, "float32")


def _existing_split_matches(
    out_dir: Path, fingerprint: str, plan: ShardPlan, dtypes: tuple[str, str], force: bool,
    group_size: int = 0, stale: list[str] | None = None,
) -> bool:
    """True if ``out_dir`` already holds this exact split; clears a different one if forced.

    ``dtypes``: the layers' and the head's; ``stale``: the model files whose content changed
    since the split there was made.
    """
    existing = rank_dirs(out_dir) if out_dir.is_dir() else []
    if not existing:
        return False
    try:
        manifests = [read_manifest(directory) for directory in existing]
    except ShardError:
        manifests = []
    same = (
        len(manifests) == plan.n_ranks
        and all(m.fingerprint == fingerprint and m.plan == plan
                and (m.dtype, m.head_format) == dtypes and m.group_size == group_size
                for m in manifests)
        and all(_files_present(d, m) for d, m in zip(existing, manifests, strict=True))
    )
    if same:
        return True
    if not force:
        why = f" (the model's {', '.join(stale)} changed since it was split)" if stale else ""
        raise ShardError(
            f"{out_dir} already holds a split of another model, plan or dtype{why}; choose "
            "another --out directory or pass --force to replace it"
        )
    for directory in existing:
        shutil.rmtree(directory)
    return False


def _files_present(directory: Path, manifest: Manifest) -> bool:
    return all(
        (directory / name).is_file() and (directory / name).stat().st_size == entry.size
        for name, entry in manifest.files.items()
    )


class _SplitWriter:
    """Reads slices from the checkpoint and writes one safetensors file at a time."""

    def __init__(self, checkpoint: Checkpoint, config: ModelConfig, plan: ShardPlan,
                 store: TensorStore, progress: ProgressFn | None) -> None:
        self.checkpoint = checkpoint
        self.config = config
        self.plan = plan
        self.store = store
        self.progress = progress
        self.files: list[dict[str, FileEntry]] = [{} for _ in range(plan.n_ranks)]
        self.bytes_written = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="edgetp-split-writer")
        self._pending: tuple[Future[tuple[Path, FileEntry]], int, str] | None = None
        self._slices = [layer_slices(plan, r, config) for r in range(plan.n_ranks)]
        self._whole = {name: TensorSlice(None) for name in self._slices[0]}

    def write_layer(self, directory: Path, rank: int, layer: int) -> None:
        tensors = {}
        slices = self._whole if self.plan.is_private(layer) else self._slices[rank]
        for name, part in slices.items():
            source = hf_name(f"layers.{layer}.{name}")
            if part.dim is None:
                tensor = self.checkpoint.get(source)
            else:
                tensor = self.checkpoint.get_slice(source, part.dim, part.start, part.stop)
            tensors.update(self.store.convert(layer, name, part, tensor))
        self._write(directory, rank, layer_file(layer), tensors)

    def write_master_file(self, directory: Path, file_name: str, names: list[str]) -> None:
        sources = {name: hf_name(name) for name in names}
        tied_head = file_name == "head.safetensors" and "lm_head.weight" not in sources
        if tied_head and self.store.head_quantized:  # the head is quantized, the embedding not
            sources["lm_head.weight"] = hf_name("embed_tokens.weight")
        tensors: dict[str, torch.Tensor] = {}
        for name, source in sources.items():
            tensors.update(self.store.convert(None, name, TensorSlice(None),
                                              self.checkpoint.get(source)))
        self._write(directory, 0, file_name, tensors)

    def _write(self, directory: Path, rank: int, file_name: str,
               tensors: dict[str, torch.Tensor]) -> None:
        """Hand the file to the writer thread, once the one before it is written: the next
        file's tensors are read and converted while this one is written and hashed."""
        self.finish()
        self._pending = (self._writer.submit(_write_file, directory / file_name, tensors),
                         rank, file_name)

    def finish(self) -> None:
        """Wait for the file being written (raising what went wrong) and record it."""
        if self._pending is None:
            return
        future, rank, file_name = self._pending
        self._pending = None
        path, entry = future.result()
        self.files[rank][file_name] = entry
        self.bytes_written += entry.size
        if self.progress is not None:
            self.progress(str(path), entry.size)

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self._writer.shutdown(wait=True)


def _write_file(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Path, FileEntry]:
    return path, write_shard_file(path.parent, path.name, tensors)


def write_shard_file(directory: Path, file_name: str,
                     tensors: dict[str, torch.Tensor]) -> FileEntry:
    """Write ``tensors`` as ``directory/file_name`` (atomically: a temporary file renamed) and
    return its manifest entry, hashed from memory; ``tensors`` is emptied once written,
    freeing what it held."""
    # save_file streams straight from the tensors; safetensors' save() would hold the whole
    # file in memory twice more (its buffer and a bytes copy), tripling the peak.
    tmp = directory / (file_name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", "producer": "edgetp"})
    entry = describe_written(tmp, tensors)  # sizes, sha256, byte ranges and checksums
    tensors.clear()
    os.replace(tmp, directory / file_name)
    return entry


def expected_files(config: ModelConfig, n_ranks: int, private_layers: int = 0) -> int:
    """How many weight files a split writes (for progress bars)."""
    shared = config.num_hidden_layers - 2 * private_layers
    return shared * n_ranks + 2 * private_layers + len(master_tensors(config))


def describe_split(result: SplitResult) -> str:
    manifest = read_manifest(result.rank_dirs[0])
    lines = [f"{'reused' if result.skipped else 'wrote'} {len(result.rank_dirs)} rank "
             f"directories in {result.out_dir} (dtype {manifest.dtype}"
             + (f", group {manifest.group_size}" if manifest.group_size else "")
             + (f", lm_head {manifest.head_format}" if manifest.head_format != manifest.dtype
                else "") + ")"]
    if result.recopied:
        lines.append(f"  changed in the model, copied again: {', '.join(result.recopied)}")
    if shrunk := shrunk_groups(manifest):
        lines.append("  int4 groups shrunk to divide the slices: "
                     + ", ".join(f"{name} {group}" for name, group in shrunk.items()))
    if manifest.plan.private_layers:
        k = manifest.plan.private_layers
        lines.append(f"  layers 0-{k - 1} and {manifest.plan.num_layers - k}-"
                     f"{manifest.plan.num_layers - 1} are private to rank-0 (the master)")
    for directory in result.rank_dirs:
        m = read_manifest(directory)
        size = sum(f.size for f in m.files.values())
        share = m.plan.share(m.rank)
        lines.append(
            f"  {directory.name}: {size / 2**20:8.1f} MiB, heads {share.q_heads[0]}-"
            f"{share.q_heads[1] - 1}, kv heads {share.kv_heads[0]}-{share.kv_heads[1] - 1}, "
            f"mlp columns {share.mlp_columns[0]}-{share.mlp_columns[1] - 1}"
        )
    if not result.skipped and result.seconds > 0:
        lines.append(f"split {format_bytes(result.bytes_read)} of weights in "
                     f"{result.seconds:.1f} s: {result.rate / 1e6:.1f} MB/s (wrote "
                     f"{format_bytes(result.bytes_written)})")
    return "\n".join(lines)

