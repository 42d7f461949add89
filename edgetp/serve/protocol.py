"""OpenAI's completion API as pydantic models: request bodies checked field by field, answers.

:class:`ChatCompletionRequest` (``POST /v1/chat/completions``) and :class:`CompletionRequest`
(``POST /v1/completions``) share :class:`GenerationRequest`. Fields this server does not know
are ignored; fields it knows but cannot honour (``tools``, ``logprobs``, penalties...) are
refused unless they ask for nothing. Types are strict (``"5"`` is not a number, ``true`` is not
an integer), numbers finite, and the ranges are declared on the fields, where
:mod:`edgetp.serve.validation` reads them to word its errors.

The phrases of the errors raised here follow the field's path (``stop must be ...``); their
type is ``invalid_value``, or ``unsupported_parameter`` (which becomes the answer's ``code``).
The answers are models too: the whole completion objects, their stream chunks, the model list
and OpenAI's error body. Nothing here knows about HTTP or the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_serializer,
    field_validator,
)
from pydantic_core import PydanticCustomError

from edgetp.config.generation import GenerationConfig, SamplingConfig

Role = Literal["system", "developer", "user", "assistant", "tool"]
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what a torch.Generator takes
PENALTY_RANGE = (0.01, 100.0)  # a repetition penalty outside keeps logits finite no more
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # the engine looks for every prefix of every stop string at each token


def invalid(phrase: str) -> PydanticCustomError:
    """An error whose message is ``phrase`` after the field's path."""
    return PydanticCustomError("invalid_value", phrase)


def unsupported(*allowed: Any) -> AfterValidator:
    """Refuse a field unless it is left out, empty, or one of ``allowed`` (asks for nothing)."""

    def check(value: Any) -> Any:
        if value is None or value in allowed or (isinstance(value, list | dict) and not value):
            return value
        raise PydanticCustomError("unsupported_parameter", "is not supported by this server")

    return AfterValidator(check)


def shown(value: Any, limit: int = 100) -> str:
    """``value`` as an error message quotes it: its ``repr``, cut after ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_text(text: str) -> str:
    """``text`` if it is valid Unicode: JSON's ``\\ud800`` escapes can make a lone surrogate,
    which no tokenizer (nor UTF-8) takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"holds a lone UTF-16 surrogate ({text[exc.start]!a}) at character "
                      f"{exc.start}: send valid Unicode") from None
    return text


def within(low: float, high: float) -> AfterValidator:
    """Refuse a number outside ``[low, high]`` (for bounds the declared range leaves open)."""

    def check(value: float | None) -> float | None:
        if value is not None and not low <= value <= high:
            raise invalid(f"must be in [{low:g}, {high:g}], got {value!r}")
        return value

    return AfterValidator(check)


def _seed(value: int | None) -> int | None:
    if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise invalid(f"must fit in 64 bits (from -2**63 to 2**64 - 1), got {value!r}")
    return value


def _stop_strings(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"must have at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    for stop in stops:
        if len(stop) > MAX_STOP_CHARS:
            raise invalid(f"strings must be at most {MAX_STOP_CHARS} characters long, got one "
                          f"of {len(stop)}")
        check_text(stop)
    return value


def one_of_forms(phrase: str) -> WrapValidator:
    """Word the failure of a union of forms as one error, ``phrase``, not one per form."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise invalid(phrase) from None

    return WrapValidator(check)


class StrictModel(BaseModel):
    """Strict types, finite numbers; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


class StreamOptions(StrictModel):
    include_usage: bool | None = None


def _one_sequence(n: int | None) -> int | None:
    if n is not None and n != 1:
        raise invalid(f"must be 1 (one sequence per request), got {n!r}")
    return n


Stop = Annotated[str | list[str] | None, one_of_forms("must be a string or a list of strings"),
                 AfterValidator(_stop_strings)]


class GenerationRequest(StrictModel):
    """What both completion endpoints share: the model, sampling, stopping and streaming.

    Fields left out take the server's defaults (:meth:`sampling`, :meth:`generation`).
    """

    model: str | None = None
    n: Annotated[int | None, AfterValidator(_one_sequence)] = None
    presence_penalty: Annotated[float | None, unsupported(0)] = None
    frequency_penalty: Annotated[float | None, unsupported(0)] = None
    logit_bias: Annotated[dict[str, Any] | None, unsupported()] = None
    best_of: Annotated[int | None, unsupported(1)] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(default=None, ge=-1)  # -1 and 0: no top-k
    seed: Annotated[int | None, AfterValidator(_seed)] = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: Annotated[float | None, Field(gt=0), within(*PENALTY_RANGE)] = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: Stop = None

    @property
    def streams(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk of token counts."""
        return self.streams and self.stream_options is not None \
            and bool(self.stream_options.include_usage)

    def sampling(self, defaults: SamplingConfig) -> SamplingConfig:
        """The request's sampling, ``defaults`` for the fields it leaves out."""

        def pick(value: float | None, default: float) -> float:
            return default if value is None else float(value)

        top_k = defaults.top_k if self.top_k is None else self.top_k
        return SamplingConfig(
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=max(0, top_k),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            seed=defaults.seed if self.seed is None else self.seed,
        )

    def generation(self, default_max_tokens: int, stop_strings: tuple[str, ...] = ()
                   ) -> GenerationConfig:
        """When to stop: the request's token limit and stop strings, then ``stop_strings``."""
        max_tokens = self.max_tokens or self.max_completion_tokens or default_max_tokens
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationConfig(max_new_tokens=max_tokens,
                                stop_strings=tuple(stops) + stop_strings)


# -- chat -------------------------------------------------------------------------------------


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


def _text_only(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        content = handler(value)
    except ValidationError:
        if isinstance(value, list):
            raise invalid('must be a list of text parts ({"type": "text", "text": ...}): '
                          "only text parts are supported") from None
        raise invalid(f"must be a string or a list of text parts, got {shown(value)}") from None
    for text in [content] if isinstance(content, str) else [p.text for p in content or []]:
        check_text(text)
    return content


MessageContent = Annotated[str | list[TextPart] | None, WrapValidator(_text_only)]


class ChatMessage(StrictModel):
    """One message of a conversation; only an assistant's may leave out ``content``."""

    role: Role
    content: MessageContent = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and info.data.get("role", "assistant") != "assistant":
            raise invalid("is required")
        return content

    def for_template(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict the chat template renders (developer -> system)."""
        content = self.content
        text = "".join(part.text for part in content) if isinstance(content, list) else content
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text or ""}


def _text_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and value != {"type": "text"}:
        raise PydanticCustomError("unsupported_parameter",
                                  'is not supported except {"type": "text"}')
    return value


class ChatCompletionRequest(GenerationRequest):
    """The body of ``POST /v1/chat/completions``."""

    tools: Annotated[list[Any] | None, unsupported()] = None
    functions: Annotated[list[Any] | None, unsupported()] = None
    logprobs: Annotated[bool | None, unsupported(False)] = None
    response_format: Annotated[dict[str, Any] | None, AfterValidator(_text_format)] = None
    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> list[dict[str, str]]:
        return [message.for_template() for message in self.messages]


# -- completions ------------------------------------------------------------------------------


def _one_prompt(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A prompt: text or token ids; a batch of one is unwrapped, a bigger batch refused."""
    if value is None:
        raise PydanticCustomError("missing", "Field required")
    if isinstance(value, list) and value and isinstance(value[0], str | list):  # a batch
        if len(value) > 1:
            raise invalid("holds several prompts: only one prompt per request is supported")
        value = value[0]
    try:
        prompt = handler(value)
    except ValidationError:
        prompt = []
    if prompt == []:
        raise invalid("must be a string, a list of token ids, or a list of one of them")
    return check_text(prompt) if isinstance(prompt, str) else prompt


PromptInput = Annotated[str | list[int], WrapValidator(_one_prompt)]


class CompletionRequest(GenerationRequest):
    """The body of ``POST /v1/completions``: one prompt, as text or token ids."""

    logprobs: Annotated[int | None, unsupported()] = None
    echo: Annotated[bool | None, unsupported(False)] = None
    suffix: Annotated[str | None, unsupported("")] = None
    prompt: PromptInput


# -- answers ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]  # the engine's eos and stop -> stop, context -> length


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextChoice(BaseModel):
    """A completion's text; in a stream, the piece since the last chunk."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatDelta(BaseModel):
    """What a chat chunk adds: the role (first chunk only), a piece of text, or nothing."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None

    @field_serializer("delta")
    def _only_what_is_added(self, delta: ChatDelta) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)


class Completion(BaseModel):
    """The common head of every answer object; ``usage`` is None in a stream's chunks."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: None = None


class TextCompletion(Completion):
    """A ``text_completion``: the whole answer, or one chunk of its stream."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = None


class ChatCompletion(Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Completion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgetp"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
