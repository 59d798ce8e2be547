"""Request bodies of the OpenAI-compatible server as pydantic models: types, ranges and sizes of every field.

Numbers are bounded by the machine types they end up in (seeds fit a 64-bit generator, counts fit an int), floats
must be finite, strings may not hold lone surrogates (they cannot be encoded as UTF-8), free-form JSON (schemas,
tool parameters) is limited in nesting depth and size, lists and strings in length. Unknown fields are ignored, as
OpenAI-compatible servers do. Checks that need the served model (context length, vocabulary) are the routes'.
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_DEPTH = 32  # nesting of free-form JSON (schemas, tool parameters)
MAX_JSON_BYTES = 64 << 10
MAX_STRING = 1 << 22  # 4 MiB of text in one field; the body limit usually bites first
INT64 = 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(s: str) -> str:
    if _SURROGATE.search(s):
        raise ValueError("string holds a lone UTF-16 surrogate (not valid Unicode)")
    return s


def _depth(x, limit: int, d: int = 0) -> int:
    if d > limit:
        raise ValueError(f"JSON nested deeper than {limit} levels")
    if isinstance(x, dict):
        for k, v in x.items():
            _no_surrogates(k)
            _depth(v, limit, d + 1)
    elif isinstance(x, list):
        for v in x:
            _depth(v, limit, d + 1)
    elif isinstance(x, str):
        _no_surrogates(x)
    elif isinstance(x, float) and not math.isfinite(x):
        raise ValueError("non-finite number in JSON")
    return d


def _free_json(x: dict) -> dict:
    _depth(x, MAX_DEPTH)
    if len(json.dumps(x)) > MAX_JSON_BYTES:
        raise ValueError(f"JSON larger than {MAX_JSON_BYTES} bytes")
    return x


Text = Annotated[str, StringConstraints(max_length=MAX_STRING), AfterValidator(_no_surrogates)]
ShortText = Annotated[str, StringConstraints(max_length=256), AfterValidator(_no_surrogates)]
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
FreeJSON = Annotated[dict[str, Any], AfterValidator(_free_json)]
Float = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# Shared sampling fields (OpenAI's plus vLLM's extensions)


class Sampling(Strict):
    model: ShortText | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Float, Field(ge=0.01, le=10)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=INT64 - 256)] | None = None  # + choice index stays in int64
    stop: Annotated[str, StringConstraints(max_length=256), AfterValidator(_no_surrogates)] | \
        Annotated[list[Annotated[str, StringConstraints(max_length=256), AfterValidator(_no_surrogates)]],
                  Field(max_length=4)] | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=128)] = 1
    max_tokens: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: Annotated[dict[Annotated[str, StringConstraints(pattern=r"^\d{1,9}$")],
                               Annotated[Float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = None
    user: ShortText | None = None

    def stops(self) -> list[str]:
        """Stop strings as a list, empty ones dropped."""
        s = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [x for x in s if x]

    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}


class StreamOptions(Strict):
    include_usage: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Chat


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(Strict):
    name: Name
    arguments: Text = "{}"


class ToolCall(Strict):
    id: ShortText = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: ShortText | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: ShortText | None = None

    @model_validator(mode="after")
    def _roles(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry 'tool_calls'")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(Strict):
    name: Name
    description: Annotated[str, StringConstraints(max_length=4096), AfterValidator(_no_surrogates)] | None = None
    parameters: FreeJSON | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: Name


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: Name = "response"
    description: ShortText | None = None
    schema_: FreeJSON = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=2048)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _combinations(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 for chat completions")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError(f"tool_choice {self._choice_text()} needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tools and self.uses_tools() and self.response_format and self.response_format.type != "text":
            raise ValueError("tools and a JSON response_format cannot be combined; pick one")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise ValueError("tool function names must be unique")
        return self

    def _choice_text(self) -> str:
        c = self.tool_choice
        return repr(c) if isinstance(c, str) else f"function {c.function.name!r}"

    def uses_tools(self) -> bool:
        """Tools are offered to the model (tool_choice is not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------------------------
# Legacy completions, embeddings, tokenizer endpoints

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=1 << 20)]


class CompletionRequest(Sampling):
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=64)] | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    response_format: ResponseFormat | None = None

    def prompts(self) -> list:
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class EmbeddingRequest(Strict):
    model: ShortText | None = None
    input: Annotated[Text, StringConstraints(min_length=1)] | TokenIds | \
        Annotated[list[Annotated[Text, StringConstraints(min_length=1)]], Field(min_length=1, max_length=2048)] | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    user: ShortText | None = None
    normalize: bool = True  # an extension (text-embeddings-inference's field): false returns the raw pooled vectors

    def inputs(self) -> list:
        x = self.input
        return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)


class TokenizeRequest(Strict):
    model: ShortText | None = None
    prompt: Text | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=2048)] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) and 'messages'")
        return self


class DetokenizeRequest(Strict):
    model: ShortText | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(max_length=1 << 20)]


Sampling.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
AnyRequest = Union[ChatRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest]
