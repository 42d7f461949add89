"""A ``.gguf`` file wherever a model directory goes: ``edgetp generate``/``convert`` on tiny GGUF
files (real subprocesses, the cache in the test's directory), the content-keyed conversion
cache, and the one-line errors of bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.gguf_files import Q, write_gguf

from edgetp.shard.gguf_cache import model_dir_for

VOCAB = 320


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    from helpers.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("gguf_cli")
    hf_dir, _ = make_hf_model(root, "llama3", vocab_size=VOCAB)
    return write_gguf(hf_dir, root / "tiny-llama.Q8_0.gguf", Q.Q8_0)


def edgetp(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGETP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgetp.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def generate(cache: Path, model: Path, *args: str) -> tuple[list[int], str]:
    done = edgetp(cache, "generate", str(model), "--prompt", "hello the world",
                  "--max-new-tokens", "6", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["token_ids"], done.stderr


def test_generate_on_a_gguf_converts_once_then_reuses(gguf_file, tmp_path):
    cache = tmp_path / "cache"
    first, log = generate(cache, gguf_file)
    assert "converting" in log
    [digest] = [d for d in (cache / "gguf").iterdir() if d.is_dir()]
    [converted] = list(digest.iterdir())
    assert converted.name == gguf_file.stem  # the model's name, e.g. for serve
    stamps = {p: p.stat().st_mtime_ns for p in converted.iterdir()}
    again, log = generate(cache, gguf_file, "--nodes", "2")
    assert again == first and "converting" not in log and "hashing" not in log
    assert {p: p.stat().st_mtime_ns for p in converted.iterdir()} == stamps
    direct, _ = generate(cache, converted)
    assert direct == first


def test_the_cache_is_keyed_by_content(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETP_CACHE", str(tmp_path / "cache"))
    first = model_dir_for(gguf_file)
    renamed = Path(shutil.copy(gguf_file, tmp_path / "other-name.gguf"))
    assert model_dir_for(renamed) == first  # same bytes: no second conversion
    assert json.loads((first / "gguf_source.json").read_text())["path"] == str(renamed)
    changed = bytearray(renamed.read_bytes())
    changed[-1] ^= 0xFF  # the last byte of the last tensor's data
    renamed.write_bytes(bytes(changed))
    assert model_dir_for(renamed) != first
    assert model_dir_for(tmp_path) == tmp_path  # a directory stays itself


def test_convert_command_writes_a_model_directory(gguf_file, tmp_path):
    done = edgetp(tmp_path / "cache", "convert", str(gguf_file), "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
            "generation_config.json"} <= names
    first, _ = generate(tmp_path / "cache", gguf_file)
    assert generate(tmp_path / "cache", tmp_path / "hf")[0] == first


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00truncated", b"plain text"])
def test_a_bad_gguf_is_one_line_of_error(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    done = edgetp(tmp_path / "cache", "generate", str(bad), "--prompt", "hi")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "not a readable GGUF file" in done.stderr
    done = edgetp(tmp_path / "cache", "generate", str(tmp_path / "missing.gguf"), "--prompt", "x")
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_launch_splits_a_gguf_named_in_the_cluster_file(gguf_file, tmp_path, monkeypatch):
    from edgetp.config.cluster import parse_cluster_config
    from edgetp.ops.launch.shipping import prepare_split
    from edgetp.shard.manifest import read_manifest

    monkeypatch.setenv("EDGETP_CACHE", str(tmp_path / "cache"))
    nodes = [{"name": n, "address": f"10.0.0.{i}", "shard_dir": str(tmp_path / n)}
             for i, n in enumerate("ab", 1)]
    config = parse_cluster_config({"model": str(gguf_file), "nodes": nodes}, "c", tmp_path)
    lines: list[str] = []
    split = prepare_split(config, lines.append)
    assert read_manifest(split / "rank-1").plan.n_ranks == 2
    assert any("converting" in line for line in lines)
    assert read_manifest(split / "rank-0").fingerprint == read_manifest(
        prepare_split(config, lines.append) / "rank-0").fingerprint


def test_plan_takes_a_gguf(gguf_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgetp.cli.main import main

    profile = {"mem_bw_gbs": 20, "matvec_gbs": {"float32": 15, "bfloat16": 8},
               "flops_gflops": 100, "disk_bw_mbs": 1000, "host": "x"}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    (tmp_path / "c.yaml").write_text(json.dumps({
        "link": {"latency_ms": 1, "bandwidth_mbit": 1000},
        "nodes": [{"profile": "p.json", "memory_budget": "1GiB"},
                  {"profile": "p.json", "memory_budget": "1GiB"}]}))
    monkeypatch.setenv("EDGETP_CACHE", str(tmp_path / "cache"))
    runs = [CliRunner().invoke(main, ["plan", "--model", str(model), "--cluster",
                                      str(tmp_path / "c.yaml"), "--context", "64",
                                      "--prompt-tokens", "8", "--new-tokens", "8", "--json"])
            for model in (gguf_file, model_dir_for(gguf_file))]
    assert [r.exit_code for r in runs] == [0, 0], runs[0].output
    assert json.loads(runs[0].stdout) == json.loads(runs[1].stdout)


def test_two_worker_processes_over_the_files_own_blocks(tmp_path):
    """A Q4_1 file split with --weight-dtype native (int4 from the file's blocks) on 2 nodes,
    with the exact reference products (EDGETP_QUANT_KERNELS=0): the tokens of one device on
    the dequantized weights."""
    from helpers.hf_models import make_hf_model

    hf_dir, _ = make_hf_model(tmp_path, "llama3", vocab_size=VOCAB)
    path = write_gguf(hf_dir, tmp_path / "tiny.Q4_1.gguf", Q.Q4_1)
    cache = tmp_path / "cache"
    os.environ["EDGETP_QUANT_KERNELS"] = "0"  # the conftest puts the environment back
    single, _ = generate(cache, path)
    native, _ = generate(cache, path, "--nodes", "2", "--weight-dtype", "native")
    assert native == single
    [split] = (cache / "splits").iterdir()
    manifest = json.loads((split / "rank-1" / "manifest.json").read_text())
    assert manifest["dtype"] == "int4"
    scales = manifest["files"]["layer-000.safetensors"]["tensors"]["mlp.up_proj.weight_scale"]
    assert scales["dtype"] == "F32"  # the file's blocks, not a second quantization


def test_an_interrupted_conversion_is_neither_used_nor_kept(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETP_CACHE", str(tmp_path / "cache"))
    done = model_dir_for(gguf_file)
    shutil.rmtree(done)
    left = done.with_name(f".{done.name}.converting-999999")  # a crash after config.json
    left.mkdir()
    (left / "config.json").write_text("{}")
    assert model_dir_for(gguf_file) == done and (done / "model.safetensors").is_file()
    assert not left.exists()
