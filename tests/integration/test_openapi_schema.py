"""``/openapi.json`` of a real ``edgetp serve`` process of the demo model, and schemathesis
against it: no generated request (valid or not, on every operation) gets a 500, answers match
their documented schemas and content types, and an undocumented method gets 405 with
``Allow``.

The run is bounded (:data:`EXAMPLES` per operation and phase, a fixed seed: about a minute);
``EDGETP_FUZZ_EXAMPLES=500 pytest tests/integration/test_openapi_schema.py`` runs more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import processes
from helpers.serving import spawn_server

from edgetp.model.demo import DEMO_MODEL_DIR

KEY = "sk-fuzz"
EXAMPLES = int(os.environ.get("EDGETP_FUZZ_EXAMPLES", "25"))
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance," \
         "unsupported_method"
START_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of ``edgetp serve`` on the demo model (one process, with an API key)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGETP_API_KEY": KEY,
           "EDGETP_CACHE": str(tmp_path_factory.mktemp("fuzz-cache"))}
    proc, url = spawn_server([str(DEMO_MODEL_DIR)], env, START_DEADLINE_S)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            processes.kill_group(proc)


def test_the_schema_documents_the_api(served: str) -> None:
    with urllib.request.urlopen(f"{served}/openapi.json", timeout=30) as response:
        document = json.loads(response.read())
    assert set(document["paths"]) == {"/health", "/metrics", "/v1/models",
                                      "/v1/models/{model_id}", "/v1/completions",
                                      "/v1/chat/completions"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    schemas = document["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert "messages" in request["required"]
    assert request["properties"]["temperature"]["anyOf"][0] == {"type": "number", "maximum": 2,
                                                                "minimum": 0}
    assert request["properties"]["model"]["anyOf"][0] == {"const": "demo_model"}
    assert set(chat["responses"]) >= {"200", "400", "401", "429", "503"}
    error = chat["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert chat["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/health"]["get"]


def schemathesis_command(url: str) -> list[str]:
    return [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(EXAMPLES), "--workers", "1",
            "--seed", "21", "--request-timeout", "30", "--header",
            f"Authorization: Bearer {KEY}"]


@pytest.mark.slow  # about 40 s of generated requests: CI runs it with the slow tests
def test_no_generated_request_gets_a_server_error(served: str, tmp_path: Path) -> None:
    done = processes.run(schemathesis_command(served), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    summary = [line for line in done.stdout.splitlines() if "generated" in line]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert summary and "passed" in summary[-1], done.stdout[-3000:]
    generated = int(summary[-1].split()[0])
    assert generated >= 6 * EXAMPLES, summary  # every operation was exercised
