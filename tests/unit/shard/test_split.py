"""edgetp.shard.split + edgetp.parallel.loader: split to disk, load every rank from its own
directory, and get the unsharded model's logits; plus idempotence, the manifest's integrity
data, corruption handling and the ``edgetp split`` command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers.hf_models import VOCAB, write_checkpoint
from helpers.parallel import sharded_greedy, sharded_logits, unsharded_greedy, unsharded_logits
from safetensors import safe_open

from edgetp.cli.main import main
from edgetp.config.model import load_model_config
from edgetp.model.checkpoint import load_model
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.loader import load_rank
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import MANIFEST_NAME, ShardError, read_manifest
from edgetp.shard.plan import make_plan
from edgetp.shard.split import split_checkpoint

ATOL = 1e-5
MAX_SEQ_LEN = 64
DECODE_STEPS = 8
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# (family, nodes, shares). llama3: 8 heads / 2 KV heads; qwen2: q/k/v biases, 4 heads / 2 KV;
# llama32: tied embeddings; attn_bias: q/k/v/o biases; mlp_bias: 4 KV heads, MLP biases.
SPLIT_CASES = [
    ("llama3", 1, None),
    ("llama3", 2, None),
    ("llama3", 3, (2, 1, 1)),  # uneven, N > KV heads
    ("llama3", 4, None),  # N > KV heads
    ("qwen2", 3, None),
    ("qwen2", 4, (1, 1, 1, 3)),
    ("llama32", 2, (3, 1)),
    ("attn_bias", 4, None),
    ("mlp_bias", 3, None),
]


def prompt_tokens(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def load_ranks(dirs: list[Path], dtype: torch.dtype = torch.float32) -> list:
    """Every rank's model, each built from its own directory only."""
    group = InProcessGroup(len(dirs))  # placeholder; run_sharded re-binds to a fresh group
    return [
        load_rank(d, group.communicator(rank), dtype=dtype, max_seq_len=MAX_SEQ_LEN)
        for rank, d in enumerate(dirs)
    ]


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def mtimes(out_dir: Path) -> dict[str, tuple[int, int]]:
    """Each file's (mtime, inode): a rewrite (even an identical one) changes them."""
    return {
        str(p.relative_to(out_dir)): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in out_dir.rglob("*")
    }


@pytest.mark.parametrize(
    "family, n, shares",
    SPLIT_CASES,
    ids=[f"{f}-N{n}" + (f"-{'_'.join(map(str, s))}" if s else "") for f, n, s in SPLIT_CASES],
)
def test_split_round_trip(tiny_model_dir, tmp_path, family, n, shares):
    path, _ = tiny_model_dir(family)
    config = load_model_config(path)
    result = split_checkpoint(path, tmp_path / "out", n, shares)
    assert not result.skipped and result.bytes_written > 0
    assert result.rank_dirs == [tmp_path / "out" / f"rank-{r}" for r in range(n)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        d.name for d in result.rank_dirs
    )

    layers = {layer_file(i) for i in range(config.num_hidden_layers)}
    for rank, directory in enumerate(result.rank_dirs):
        manifest = read_manifest(directory)
        assert manifest.rank == rank
        assert manifest.plan == make_plan(config, n, shares)
        assert manifest.model_config == config
        if rank == 0:
            weights = layers | {"embed.safetensors", "head.safetensors"}
            assert files_in(directory) >= weights | {MANIFEST_NAME, "config.json"}
            assert set(manifest.files) == weights
        else:  # a worker gets its layer slices and the manifest, nothing else
            assert files_in(directory) == layers | {MANIFEST_NAME}
            assert set(manifest.files) == layers

    ref = load_model(path, max_seq_len=MAX_SEQ_LEN)
    ranks = load_ranks(result.rank_dirs)
    tokens = prompt_tokens()
    diff = (sharded_logits(ranks, n, tokens) - unsharded_logits(ref, tokens)).abs().max().item()
    assert diff <= ATOL, f"prompt logits differ by {diff:.3g}"
    ref_tokens, _ = unsharded_greedy(ref, tokens, DECODE_STEPS)
    our_tokens, _ = sharded_greedy(ranks, n, tokens, DECODE_STEPS)
    assert our_tokens == ref_tokens


def test_load_rank_inside_threads(tiny_model_dir, tmp_path):
    """Ranks loading concurrently (as on a cluster) from their own directories."""
    path, _ = tiny_model_dir("llama3")
    dirs = split_checkpoint(path, tmp_path / "out", 3).rank_dirs
    tokens = prompt_tokens()
    ours = sharded_logits(
        lambda rank, comm: load_rank(dirs[rank], comm, max_seq_len=MAX_SEQ_LEN), 3, tokens
    )
    ref = unsharded_logits(load_model(path, max_seq_len=MAX_SEQ_LEN), tokens)
    assert (ours - ref).abs().max().item() <= ATOL


def test_split_again_is_a_no_op(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    out = tmp_path / "out"
    split_checkpoint(path, out, 3, (2, 1, 1))
    before = mtimes(out)
    again = split_checkpoint(path, out, 3, (2.0, 1.0, 1.0))
    assert again.skipped and again.bytes_written == 0
    assert again.rank_dirs == [out / f"rank-{r}" for r in range(3)]
    assert mtimes(out) == before


def test_different_split_needs_force(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    other_model, _ = tiny_model_dir("qwen2")
    out = tmp_path / "out"
    split_checkpoint(path, out, 3)
    before = mtimes(out)
    for args, kwargs in [
        ((path, out, 2), {}),  # fewer ranks
        ((path, out, 3, (2, 1, 1)), {}),  # other shares
        ((path, out, 3), {"dtype": "bfloat16"}),  # other dtype
        ((other_model, out, 3), {}),  # another model
    ]:
        with pytest.raises(ShardError, match="already holds a split.*--force"):
            split_checkpoint(*args, **kwargs)
    assert mtimes(out) == before  # nothing was touched

    result = split_checkpoint(path, out, 2, force=True)
    assert not result.skipped
    assert sorted(p.name for p in out.iterdir()) == ["rank-0", "rank-1"]  # rank-2 removed
    assert all(read_manifest(d).plan.n_ranks == 2 for d in result.rank_dirs)


def test_bfloat16_split(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("qwen2")
    result = split_checkpoint(path, tmp_path / "out", 3, dtype="bfloat16")
    for directory in result.rank_dirs:
        manifest = read_manifest(directory)
        assert manifest.dtype == "bfloat16"
        for name, entry in manifest.files.items():
            assert {t.dtype for t in entry.tensors.values()} == {"BF16"}
            with safe_open(directory / name, framework="pt") as handle:
                for tensor_name in handle.keys():
                    assert handle.get_tensor(tensor_name).dtype == torch.bfloat16
    # Loaded in float32, the shards compute exactly what the bf16-rounded model computes.
    rounded = write_checkpoint(path, tmp_path / "bf16", dtype=torch.bfloat16)
    ref = load_model(rounded, max_seq_len=MAX_SEQ_LEN)
    tokens = prompt_tokens()
    ours = sharded_logits(load_ranks(result.rank_dirs), 3, tokens)
    assert (ours - unsharded_logits(ref, tokens)).abs().max().item() <= ATOL


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_manifest_describes_the_files_exactly(tiny_model_dir, tmp_path, dtype):
    path, _ = tiny_model_dir("attn_bias")
    result = split_checkpoint(path, tmp_path / "out", 3, dtype=dtype)
    for directory in result.rank_dirs:
        manifest = read_manifest(directory)
        assert set(manifest.files) == {p.name for p in directory.glob("*.safetensors")}
        for name, entry in manifest.files.items():
            data = (directory / name).read_bytes()
            assert entry.size == len(data)
            assert entry.sha256 == hashlib.sha256(data).hexdigest()
            with safe_open(directory / name, framework="pt") as handle:
                assert set(handle.keys()) == set(entry.tensors)
                for tensor_name, t in entry.tensors.items():
                    expected = handle.get_tensor(tensor_name)
                    start, stop = t.offsets
                    assert 0 < start <= stop <= len(data)
                    assert stop - start == expected.numel() * expected.element_size()
                    raw = torch.frombuffer(
                        bytearray(data[start:stop]), dtype=SAFETENSORS_DTYPES[t.dtype]
                    ).reshape(t.shape)
                    assert tuple(expected.shape) == t.shape
                    assert raw.dtype == expected.dtype
                    assert torch.equal(raw, expected), f"{name}:{tensor_name} offsets are wrong"


# --- damaged shard directories ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_split(tiny_model_dir, tmp_path_factory):
    """A 2-rank split of the 3-layer llama2 model (copy before damaging it)."""
    path, _ = tiny_model_dir("llama2")
    out = tmp_path_factory.mktemp("damage") / "out"
    split_checkpoint(path, out, 2)
    return out


@pytest.fixture
def split_copy(pristine_split, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_split, tmp_path / "out"))


def load_alone(directory: Path, rank: int, n: int = 2):
    return load_rank(directory, InProcessGroup(n).communicator(rank), max_seq_len=MAX_SEQ_LEN)


def test_undamaged_split_loads(split_copy):
    for rank in range(2):
        load_alone(split_copy / f"rank-{rank}", rank)


@pytest.mark.parametrize("rank, file_name", [(1, "layer-001.safetensors"), (0, "head.safetensors")])
def test_flipped_byte_is_detected(split_copy, rank, file_name):
    target = split_copy / f"rank-{rank}" / file_name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{file_name} fails its sha256 check.*corrupted"):
        load_alone(split_copy / f"rank-{rank}", rank)


def test_truncated_file_is_detected(split_copy):
    target = split_copy / "rank-1" / "layer-002.safetensors"
    size = target.stat().st_size
    os.truncate(target, size - 10)
    expected = rf"layer-002\.safetensors has {size - 10} bytes.*truncated"
    with pytest.raises(ShardError, match=expected):
        load_alone(split_copy / "rank-1", 1)


def test_missing_layer_file_is_detected(split_copy):
    (split_copy / "rank-1" / "layer-000.safetensors").unlink()
    with pytest.raises(ShardError, match=r"layer-000\.safetensors is missing"):
        load_alone(split_copy / "rank-1", 1)


def test_missing_manifest(split_copy):
    (split_copy / "rank-1" / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match=r"manifest\.json not found.*edgetp split"):
        load_alone(split_copy / "rank-1", 1)


def test_garbled_manifest(split_copy):
    (split_copy / "rank-0" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        load_alone(split_copy / "rank-0", 0)
    (split_copy / "rank-0" / MANIFEST_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardError, match="not an edgetp shard manifest"):
        load_alone(split_copy / "rank-0", 0)


def test_directory_of_another_rank(split_copy):
    with pytest.raises(ValueError, match="holds rank 1's shard but this node is rank 0"):
        load_alone(split_copy / "rank-1", 0)


def test_a_damaged_split_is_not_reused(tiny_model_dir, tmp_path):
    """Splitting again over a truncated file is not a silent no-op."""
    path, _ = tiny_model_dir("llama3")
    out = tmp_path / "out"
    split_checkpoint(path, out, 2)
    os.truncate(out / "rank-1" / "layer-000.safetensors", 5)
    with pytest.raises(ShardError, match="--force"):
        split_checkpoint(path, out, 2)
    assert not split_checkpoint(path, out, 2, force=True).skipped
    load_alone(out / "rank-1", 1)


# --- the command line ---------------------------------------------------------------------------


def test_cli_split(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama3")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["split", str(path), "--nodes", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("wrote 2 rank directories") and "float32" in lines[0]
    assert lines[1].strip().startswith("rank-0:") and lines[2].strip().startswith("rank-1:")
    assert "heads 0-3, kv heads 0-0" in lines[1] and "heads 4-7, kv heads 1-1" in lines[2]
    assert all("MiB" in line and "mlp columns" in line for line in lines[1:3])
    assert re.fullmatch(r"split .+ of weights in [0-9.]+ s: [0-9.]+ MB/s \(wrote .+\)", lines[3])
    assert (out / "rank-1" / MANIFEST_NAME).is_file()

    again = runner.invoke(main, ["split", str(path), "--nodes", "2", "--out", str(out)])
    assert again.exit_code == 0 and again.stdout.startswith("reused 2 rank directories")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "2", "--shares", "1,x"], "comma-separated numbers"),
        (["--nodes", "2", "--shares", "1,2,3"], "gives 3 values for 2 nodes"),
        (["--nodes", "2", "--shares", "1,0"], "must be positive"),
        (["--nodes", "9"], "use at most 8 nodes"),
    ],
)
def test_cli_split_bad_request(tiny_model_dir, tmp_path, args, message):
    path, _ = tiny_model_dir("llama3")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["split", str(path), "--out", str(out), *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "rror" in line]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (out / "rank-0" / MANIFEST_NAME).exists()


# --- checksums from memory ----------------------------------------------------------------------


def test_a_written_file_is_described_from_memory_as_from_disk(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from edgetp.shard import checksums

    tensors = {"embed_tokens.weight": torch.randn(3000, 16),
               "b.weight": torch.randn(3, 5).bfloat16(), "empty": torch.zeros(0),
               "codes": torch.randint(0, 255, (64, 8), dtype=torch.uint8)}
    path = tmp_path / "f.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    from_disk = checksums.describe_file(path)
    assert len(from_disk.tensors["embed_tokens.weight"].xxh3) > 1  # row chunks
    reads = []
    monkeypatch.setattr(checksums, "describe_file", lambda p: reads.append(p) or from_disk)
    assert checksums.describe_written(path, tensors) == from_disk and not reads
    other = dict(tensors, codes=tensors["codes"][:32])  # not what the file holds: read it
    assert checksums.describe_written(path, other) == from_disk and reads == [path]
