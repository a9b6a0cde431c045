"""Cohere's Chat API v2 (`POST /v2/chat`) wire format, as pydantic models.

The subset real clients send (cohere 5.x/7.x, langchain-cohere), from /work/shared/cohere-v2-api.md.
As in openai_schema.py, requests are validated strictly (no string-to-number coercion); `null`
means absent and unknown fields are ignored. Every class is prefixed `Cohere` so that the
OpenAPI document keeps them apart from the OpenAI models of the same role.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, populate_by_name=True)
INT32_MAX = 2**31 - 1


class _Request(BaseModel):
    model_config = _STRICT


# -- request -----------------------------------------------------------------------------------


class CohereTextContent(_Request):
    type: Literal["text"]
    text: str


class CohereImageUrl(_Request):
    url: str
    detail: str | None = None


class CohereImageContent(_Request):
    type: Literal["image_url"]
    image_url: CohereImageUrl


class CohereThinkingContent(_Request):
    type: Literal["thinking"]
    thinking: str


class CohereDocument(_Request):
    id: str | None = Field(None, description="Named in citations; default `doc:<i>` (or `<tool_call_id>:<i>`).")
    data: dict[str, Any] | str = Field(description="The document's fields; JSON text of an object is parsed.")


class CohereDocumentContent(_Request):
    type: Literal["document"]
    document: CohereDocument


UserPart = Annotated[Union[CohereTextContent, CohereImageContent], Field(discriminator="type")]
AssistantPart = Annotated[Union[CohereTextContent, CohereThinkingContent], Field(discriminator="type")]
ToolPart = Annotated[Union[CohereTextContent, CohereDocumentContent], Field(discriminator="type")]


class CohereSystemMessage(_Request):
    role: Literal["system"]
    content: str | list[CohereTextContent]


class CohereUserMessage(_Request):
    role: Literal["user"]
    content: str | list[UserPart] = Field(description="Text; images are refused (Command R7B reads text only).")


class CohereToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] | None = Field(None, description="JSON text of an object.")


class CohereToolCall(_Request):
    id: str | None = None
    type: Literal["function"] | None = None
    function: CohereToolCallFunction


class CohereAssistantMessage(_Request):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    tool_plan: str | None = None
    tool_calls: list[CohereToolCall] | None = None
    citations: list[Any] | None = Field(None, description="Accepted and ignored (a response message sent back).")


class CohereToolMessage(_Request):
    role: Literal["tool"]
    tool_call_id: str
    content: str | list[ToolPart] = Field(description="Text (JSON text is shown as JSON) or documents.")


CohereMessage = Annotated[Union[CohereSystemMessage, CohereUserMessage, CohereAssistantMessage, CohereToolMessage],
                          Field(discriminator="role")]


class CohereToolFunction(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments.")


class CohereTool(_Request):
    type: Literal["function"]
    function: CohereToolFunction


class CohereCitationOptions(_Request):
    mode: Literal["ACCURATE", "FAST", "OFF", "ENABLED", "DISABLED"] | None = Field(
        None, description="OFF or DISABLED: no citations; any other: citations of documents and tool results.")


class CohereResponseFormat(_Request):
    type: Literal["text", "json_object"]
    json_schema: dict[str, Any] | None = Field(None, description="JSON Schema the answer must match.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="langchain-cohere's name for "
                                                                             "`json_schema`.")


class CohereThinking(_Request):
    type: Literal["enabled", "disabled"]
    token_budget: int | None = None


IGNORED = "Accepted and ignored."


class CohereChatRequest(_Request):
    model: str | None = Field(None, description="Any name; this server runs one model.")
    messages: list[CohereMessage] = Field(min_length=1)
    documents: list[str | CohereDocument] | None = Field(None, description="Documents to ground the answer in.")
    tools: list[CohereTool] | None = None
    tool_choice: Literal["REQUIRED", "NONE"] | None = Field(
        None, description="Absent: the model decides; REQUIRED: a grammar makes it call a tool; NONE: it answers.")
    strict_tools: bool | None = Field(None, description="Tool calls follow the tools' schemas (a grammar).")
    citation_options: CohereCitationOptions | None = None
    response_format: CohereResponseFormat | None = Field(
        None, description="`json_object` makes the answer JSON (matching `json_schema` or `schema`) through a grammar.")
    safety_mode: Literal["CONTEXTUAL", "STRICT", "OFF"] | None = Field(
        None, description="STRICT adds Cohere's strict safety preamble; CONTEXTUAL (default) and OFF add nothing.")
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    stop_sequences: list[str] | None = Field(None, max_length=5)
    temperature: float | None = Field(None, ge=0, le=2, description="Default 0.3; 0 is greedy.")
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=0, le=1)
    k: int | None = Field(None, ge=0, le=500, description="Top-k sampling (0: off).")
    p: float | None = Field(None, ge=0, le=1, description="Top-p sampling; default 0.75.")
    logprobs: bool | None = Field(None, description=IGNORED)
    thinking: CohereThinking | None = Field(None, description=IGNORED)
    priority: int | None = Field(None, description=IGNORED)
    stream: bool | None = Field(False, description="Server-sent events.")


# -- response ----------------------------------------------------------------------------------


def _absent(value: object) -> bool:
    return value is None


class CohereTextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class CohereFunctionOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of an object.")


class CohereToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CohereFunctionOut


class CohereDocumentSource(BaseModel):
    type: Literal["document"] = "document"
    id: str
    document: dict[str, Any]


class CohereToolSource(BaseModel):
    type: Literal["tool"] = "tool"
    id: str
    tool_output: dict[str, Any]


class CohereCitation(BaseModel):
    start: int = Field(description="Code-point offset of the cited span in the text.")
    end: int = Field(description="Exclusive.")
    text: str
    type: Literal["TEXT_CONTENT", "PLAN"] = "TEXT_CONTENT"
    sources: list[Annotated[Union[CohereDocumentSource, CohereToolSource], Field(discriminator="type")]]


class CohereMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[CohereTextOut] | None = Field(None, exclude_if=_absent)
    tool_plan: str | None = Field(None, exclude_if=_absent)
    tool_calls: list[CohereToolCallOut] | None = Field(None, exclude_if=_absent)
    citations: list[CohereCitation] | None = Field(None, exclude_if=_absent)


class CohereTokens(BaseModel):
    input_tokens: int
    output_tokens: int


class CohereUsage(BaseModel):
    billed_units: CohereTokens
    tokens: CohereTokens
    cached_tokens: int = Field(0, description="Prompt tokens reused from the previous request's KV cache.")


FinishReason = Literal["COMPLETE", "STOP_SEQUENCE", "MAX_TOKENS", "TOOL_CALL", "ERROR", "TIMEOUT"]


class CohereChatResponse(BaseModel):
    id: str
    finish_reason: FinishReason
    message: CohereMessageOut
    usage: CohereUsage


class CohereError(BaseModel):
    id: str
    message: str


# One server-sent event (see openai_schema.SSE_EVENT); `data` is one of the v2 stream events.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "description": "One server-sent event: `data` is a JSON object whose `type` is message-start, content-start, "
                   "content-delta, content-end, tool-plan-delta, tool-call-start, tool-call-delta, tool-call-end, "
                   "citation-start, citation-end or message-end (which carries `error` if the generation failed "
                   "after the status line was sent), then, last, `[DONE]`.",
    "properties": {"data": {"anyOf": [
        {"type": "string", "const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}},
    ]}},
}
