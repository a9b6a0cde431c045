"""The OpenAI chat-completions wire format, with Command R7B's extensions, as pydantic models.

Requests are validated strictly (a number sent as a string is rejected, not coerced) so that the
OpenAPI document built from these models is the contract the server enforces. Fields that OpenAI
clients send routinely but that the local model cannot honour are listed, accepted and ignored;
any other unknown field is ignored too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .request import MAX_BIAS, MAX_N, MAX_TOP_LOGPROBS

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, populate_by_name=True)
INT32_MAX = 2**31 - 1
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = _STRICT


# -- request -----------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


Content = Union[str, list[TextPart]]
CONTENT_DOC = "A string, or a list of text parts (other part types are not supported)."


class SystemMessage(_Request):
    role: Literal["system", "developer"] = Field(description="`developer` is treated as `system`.")
    content: Content = Field(description=CONTENT_DOC)
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: Content = Field(description=CONTENT_DOC)
    name: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text of the arguments (an object is also accepted).")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Request):
    role: Literal["assistant"]
    content: Content | None = Field(None, description=CONTENT_DOC)
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = Field(None, description="The tool plan written before `tool_calls`.")
    tool_plan: str | None = Field(None, description="Cohere's name for `reasoning_content`.")
    name: str | None = None


class ToolMessage(_Request):
    role: Literal["tool"]
    content: Content = Field(description=CONTENT_DOC + " JSON text is passed to the model as JSON.")
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments.")
    strict: bool | None = Field(None, description="Accepted; arguments follow the schema under a forced tool_choice.")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["auto", "none", "required"], NamedToolChoice]


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="JSON Schema the answer must match.")
    strict: bool | None = None


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


class StreamOptions(_Request):
    include_usage: bool | None = Field(None, description="Send a last chunk with empty `choices` and the usage.")


IGNORED = "Accepted and ignored."


class ChatCompletionRequest(_Request):
    model: str | None = Field(None, description="The served model's name (see GET /v1/models); may be omitted.")
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description="`auto` (default), `none` (tools are ignored and the model answers), `required` or a "
                          "named function (a grammar makes the model call a tool).")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 0.3; 0 is greedy.")
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX, description="Extension: top-k sampling (0: off).")
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over `max_tokens`.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="With `n` > 1, answer i is sampled with `seed + i`.")
    n: int | None = Field(None, ge=1, le=MAX_N, description=f"Answers to sample (at most {MAX_N}); the prompt is "
                                                            "evaluated once for all of them.")
    logprobs: bool | None = Field(None, description="Return each content token's log-probability: the log-softmax "
                                                    "of the model's raw logits, before sampling, as llama-server "
                                                    "reports it.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="With `logprobs`: this many likeliest tokens at each position.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Penalty per earlier occurrence of a "
                                            "token among the last `repeat_last_n` (prompt included).")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Penalty for a token seen among the last "
                                           "`repeat_last_n` (prompt included).")
    # llama-server's sampling extensions, by its names.
    min_p: float | None = Field(None, ge=0, le=1, description="Extension: min-p sampling (0: off).")
    repeat_penalty: float | None = Field(None, gt=0, le=10, description="Extension: llama.cpp's repetition "
                                         "penalty (1: off).")
    repeat_last_n: int | None = Field(None, ge=-1, le=INT32_MAX, description="Extension: tokens the penalties "
                                      "look back on (default 64; -1: the context; 0: penalties off).")
    dry_multiplier: float | None = Field(None, ge=0, le=100, description="Extension: DRY repetition penalty "
                                         "strength (0: off).")
    dry_base: float | None = Field(None, ge=1, le=100, description="Extension: DRY base (default 1.75).")
    dry_allowed_length: int | None = Field(None, ge=0, le=INT32_MAX, description="Extension: repeated sequences "
                                           "longer than this are penalized by DRY (default 2).")
    dry_penalty_last_n: int | None = Field(None, ge=-1, le=INT32_MAX, description="Extension: tokens DRY scans "
                                           "(default 64; -1: the context).")
    dry_sequence_breakers: list[str] | None = Field(None, min_length=1, max_length=32, description="Extension: "
                                                    'strings that end a DRY sequence (default ["\\n", ":", '
                                                    '"\\"", "*"]).')
    logit_bias: dict[TokenId, Bias] | None = Field(
        None, description="Token id (as text) to a bias from -100 to 100, added to the model's logits before "
                          "sampling: -100 all but bans a token, 100 all but forces it.")
    ignore_eos: bool | None = Field(None, description="Extension, as llama-server: ban the tokens that end the turn, "
                                                      "so the answer runs to `max_tokens` (for benchmarks).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(
        None, description="`json_object` or `json_schema` make the answer JSON through a grammar.")
    documents: list[dict[str, Any] | str] | None = Field(
        None, description="Extension: documents to ground the answer in (objects of any keys, or strings).")
    citations_enabled: bool | None = Field(
        None, description="Extension: ask for citations of documents and tool results (default: on with documents).")
    enable_citations: bool | None = Field(None, description="Extension: the same as `citations_enabled`.")
    # Sent by common clients; a local llama.cpp model has nothing to do with them.
    user: str | None = Field(None, description=IGNORED)
    parallel_tool_calls: bool | None = Field(None, description=IGNORED + " The model may call several tools at once.")
    metadata: dict[str, str] | None = Field(None, description=IGNORED)
    store: bool | None = Field(None, description=IGNORED)
    service_tier: str | None = Field(None, description=IGNORED)


# -- response ----------------------------------------------------------------------------------


def _absent(value: object) -> bool:
    return value is None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(ToolCallOut):
    index: int


class CitationSource(BaseModel):
    tool_call_id: str = Field(description='"0" for the request\'s documents, else the tool call whose result is cited.')
    index: int = Field(description="Position of the document, or 0 for a tool result.")


class Citation(BaseModel):
    start: int = Field(description="Character offset of the cited span in `content`.")
    end: int
    text: str
    sources: list[CitationSource]


class AssistantMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_absent)
    reasoning_content: str | None = Field(None, exclude_if=_absent, description="Extension: the tool plan.")
    citations: list[Citation] | None = Field(None, exclude_if=_absent,
                                             description="Extension: grounded spans of `content`.")


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = Field(description="The generated tokens, control tokens left out.")


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessageOut
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens reused from the previous request's KV cache.")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)
    reasoning_content: str | None = Field(None, exclude_if=_absent)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_absent)
    citations: list[Citation] | None = Field(None, exclude_if=_absent)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = Field(None, exclude_if=_absent)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# OpenAPI 3.1 has no word for one event of a stream; `schema` of text/event-stream describes one
# event, as OpenAPI 3.2's `itemSchema` does (and as schemathesis reads it).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "description": "One server-sent event. `data`: a `chat.completion.chunk`, an error in the `{\"error\": ...}` "
                   "shape (the status line has gone already), or, last, `[DONE]`.",
    "properties": {"data": {"anyOf": [
        {"type": "string", "const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [_ref(ChatCompletionChunk), _ref(ErrorResponse)]}},
    ]}},
}


def stream_components() -> dict[str, dict]:
    """Schemas that SSE_EVENT refers to, for the OpenAPI document's components."""
    schema = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    return {**schema.pop("$defs", {}), "ChatCompletionChunk": schema}
