"""Chat templates render in a bounded sandbox process (``edgetp.model.template_renderer``).

A template that loops for ever, wants 10 GB or outputs too much fails with a clear message
within its bounds; the renderer replaces a child that died and goes on rendering; its
children end when it closes them. Through :class:`Tokenizer`, the errors are
:class:`ChatTemplateError` (:class:`ChatTemplateTooLong` for too long an output).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.model.template_renderer import RenderFailed, TemplateRenderer
from edgetp.model.tokenizer import ChatTemplateError, ChatTemplateTooLong, Tokenizer

MESSAGES = [{"role": "user", "content": "count by 3 : 5"}]
ECHO = "{{ bos_token }}{{ messages[0]['content'] }}{% if add_generation_prompt %}>{% endif %}"


@pytest.fixture
def renderer() -> Iterator[TemplateRenderer]:
    rendering = TemplateRenderer(processes=1)
    yield rendering
    rendering.close()


def render(renderer: TemplateRenderer, template: str, **bounds: float) -> str:
    return renderer.render(template, MESSAGES, True, {"bos_token": "<s>"}, **bounds)


def test_a_template_renders_as_jinja_would(renderer: TemplateRenderer) -> None:
    assert render(renderer, ECHO) == "<s>count by 3 : 5>"
    assert render(renderer, "{{ raise_exception('no') if false }}{{ 'é' | tojson }}") == '"é"'


@pytest.mark.parametrize(("template", "bounds", "message", "within_s"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     {"deadline_s": 2.0}, "the chat template did not render in 2 s", 8.0),
    ("{{ 'A' * 10**10 }}", {}, "chat template failed to render: it needs more than 1024 MiB",
     8.0),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s | length }}", {}, "it needs more than 1024 MiB", 15.0),
    ("{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}", {"max_chars": 5000},
     "the chat template's output passed 5000 characters", 8.0),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", {}, "recurses too deeply", 8.0),
    ("{{ raise_exception('must start with a user message') }}", {},
     "chat template error: must start with a user message", 8.0),
    ("{% for %}", {}, "chat template does not compile", 8.0),
])
def test_a_hostile_or_broken_template_fails_within_its_bounds(
        renderer: TemplateRenderer, template: str, bounds: dict[str, float], message: str,
        within_s: float) -> None:
    started = time.monotonic()
    with pytest.raises(RenderFailed) as info:
        render(renderer, template, **bounds)
    assert message in str(info.value)
    assert info.value.too_long == ("output passed" in message)
    assert time.monotonic() - started < within_s
    assert render(renderer, ECHO) == "<s>count by 3 : 5>"  # the renderer goes on


def test_a_dead_child_is_replaced_and_closed_children_end(renderer: TemplateRenderer) -> None:
    assert render(renderer, ECHO)
    (child,) = renderer._idle
    child.proc.kill()
    child.proc.wait()
    assert render(renderer, ECHO) == "<s>count by 3 : 5>"
    (replacement,) = renderer._idle
    assert replacement is not child
    renderer.close()
    assert replacement.proc.wait(10) == 0  # it saw the end of its input and returned
    assert render(renderer, ECHO)  # closing is not final: a new child starts when needed


def test_the_tokenizer_raises_chat_template_errors(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.apply_chat_template(MESSAGES) == "<s>count by 3 : 5"
    with pytest.raises(ChatTemplateTooLong, match="passed 10 characters"):
        tokenizer.apply_chat_template(MESSAGES, max_chars=10)
    tokenizer.chat_template = "{{ 'A' * 10**10 }}"
    with pytest.raises(ChatTemplateError, match="needs more than 1024 MiB") as info:
        tokenizer.apply_chat_template(MESSAGES)
    assert not isinstance(info.value, ChatTemplateTooLong)
