"""The bundled known-answer demo model and the rule it was trained on.

``count by K : A`` continues ``A+K A+2K ...`` up to the largest value not above
:data:`MAX_NUMBER`, then ends with EOS. :func:`expected_continuation` computes the right
answer from the rule, so tests and users can check the model's output without a stored string.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
DEMO_DRAFT_DIR = Path(__file__).parent / "demo_draft"  # a smaller model of the same rule and
# tokenizer, for speculative decoding (``--draft``)
MAX_NUMBER = 99
MAX_STEP = 9
DEMO_PROMPT = "count by 3 : 5"


def demo_prompt(step: int, start: int) -> str:
    return f"count by {step} : {start}"


def expected_continuation(step: int, start: int) -> list[int]:
    """The numbers that must follow ``count by step : start`` (EOS comes after them)."""
    return list(range(start + step, MAX_NUMBER + 1, step))


def expected_text(step: int, start: int) -> str:
    return " ".join(str(n) for n in expected_continuation(step, start))
