"""``config.json`` is checked (``edgetp.config.model``): each wrong value is one clear error.

The message names the file, the key, what it holds and what it must hold; a config that was
accepted before (integral floats such as ``1e8`` included) still reads the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgetp.config.model import load_model_config, parse_hf_config
from edgetp.core.errors import ConfigError
from edgetp.model.demo import DEMO_MODEL_DIR

DEMO = json.loads((DEMO_MODEL_DIR / "config.json").read_text())


def with_keys(**changes: Any) -> dict[str, Any]:
    raw = {**DEMO, **changes}
    return {k: v for k, v in raw.items() if v is not ...}  # ...: the key is left out


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_attention_heads": 0}, "num_attention_heads must be >= 1, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be >= 1, got 0"),
    ({"hidden_size": "96"}, "hidden_size must be a whole number, got '96'"),
    ({"vocab_size": True}, "vocab_size must be a whole number, got True"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a whole number, got 2.5"),
    ({"intermediate_size": -256}, "intermediate_size must be >= 1, got -256"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be >= 1, got 0"),
    ({"head_dim": 0}, "head_dim must be >= 1, got 0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a number > 0, got 0"),
    ({"rope_theta": "1e4"}, "rope_theta must be a number, got '1e4'"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id[1] must be a whole number, got 'x'"),
    ({"num_key_value_heads": 3},
     "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    ({"hidden_size": 100, "head_dim": ...},
     "hidden_size=100 is not a multiple of num_attention_heads=8; give head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is unsupported (silu only)"),
    ({"vocab_size": ...}, "the required key 'vocab_size' is missing"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 0}},
     "rope_scaling.factor must be a number > 0, got 0"),
    ({"rope_parameters": {"rope_type": "llama3", "low_freq_factor": 4, "high_freq_factor": 4}},
     "rope high_freq_factor=4 must be above low_freq_factor=4"),
])
def test_each_wrong_value_is_one_clear_error(tmp_path: Path, changes: dict[str, Any],
                                             message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(with_keys(**changes)))
    with pytest.raises(ConfigError) as info:
        load_model_config(tmp_path)
    assert str(info.value) == f"{path}: {message}"


def test_a_good_config_reads_as_before() -> None:
    config = parse_hf_config(with_keys(max_position_embeddings=1e8, eos_token_id=[2, 3],
                                       sliding_window=0))
    assert config.max_position_embeddings == 100_000_000
    assert isinstance(config.max_position_embeddings, int)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (96, 8, 4, 12)
    assert config.eos_token_ids == (2, 3) and config.bos_token_id == 1
    assert config.sliding_window is None and config.torch_dtype == "float32"
    assert parse_hf_config(with_keys(num_key_value_heads=None)).num_key_value_heads == 8
    assert parse_hf_config(with_keys(head_dim=None)).head_dim == 12
