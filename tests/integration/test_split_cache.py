"""The split cache of local clusters follows the model's files (``edgetp generate --nodes 2``,
real worker processes; the cache in the test's directory):

* new weights of the same shapes saved in place over the model, with the old modification
  time put back, give the new model's tokens on the next run (not the old split's);
* an edited chat template in tokenizer_config.json is used on the next run, and only copied:
  the weight files of the split stay as they are;
* an unchanged model reuses its split without hashing anything (the split's files and its
  source record stay untouched).

The same in process, file by file: tests/unit/shard/test_split_sources.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers.files import resave_safetensors, stat_key

from edgetp.cli.main import main
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.shard.sources import SOURCE_RECORD_NAME

PROMPT = demo_prompt(3, 5)


@pytest.fixture
def model(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO_MODEL_DIR, tmp_path / "model"))


def generate(model: Path, cache: Path, *args: str, tokens: int = 8) -> dict[str, Any]:
    """``edgetp generate MODEL --json`` with ``args``: the report of the run."""
    result = CliRunner().invoke(
        main, ["generate", str(model), "--prompt", PROMPT, "--max-new-tokens", str(tokens),
               "--json", *args],
        env={"EDGETP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def split_files(cache: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime, inode) of every file of the one split in the cache."""
    [split] = (cache / "splits").iterdir()
    return {str(p.relative_to(split)): stat_key(p) for p in sorted(split.rglob("*"))
            if p.is_file() and "logs" not in p.parts}


def perturbed(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Another model of the same shapes: the head's rows rotated by one (each token's score
    goes to the next id), the rest nudged."""
    if name == "lm_head.weight":
        return torch.roll(tensor, 1, dims=0)
    if tensor.dim() < 2:
        return tensor
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name)))
    return tensor + 0.1 * tensor.std() * noise


def test_new_weights_saved_in_place_are_used(model, tmp_path):
    cache = tmp_path / "cache"
    old = generate(model, cache, "--nodes", "2")
    assert expected_text(3, 5).startswith(old["text"].strip())
    key = stat_key(model / "model.safetensors")
    resave_safetensors(model / "model.safetensors", perturbed, keep_mtime=True)
    assert stat_key(model / "model.safetensors") == key  # size, mtime and inode as before

    want = generate(model, cache)["token_ids"]  # one device, straight from the model
    got = generate(model, cache, "--nodes", "2")["token_ids"]
    assert want != old["token_ids"], "the perturbation should change the answer"
    assert got == want


def test_an_edited_chat_template_is_used_and_the_split_reused(model, tmp_path):
    cache = tmp_path / "cache"
    chat = generate(model, cache, "--nodes", "2", "--chat", tokens=128)
    assert chat["text"].strip() == expected_text(3, 5)  # the template passes the prompt on
    first = split_files(cache)
    generate(model, cache, "--nodes", "2")
    assert split_files(cache) == first  # reused; nothing hashed, so the record is untouched

    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}" + demo_prompt(2, 4)  # whatever is asked
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    chat = generate(model, cache, "--nodes", "2", "--chat", tokens=128)
    assert chat["text"].strip() == expected_text(2, 4)
    after = split_files(cache)
    changed = {name for name in first if after.get(name) != first[name]}
    assert changed == {"rank-0/tokenizer_config.json", f"rank-0/{SOURCE_RECORD_NAME}"}
