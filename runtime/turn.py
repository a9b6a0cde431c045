"""One assistant turn: what it returns, and `chat`, which asks any model-like object for it.

`TurnAPI.chat` turns keyword arguments into a `ChatRequest` and runs it through the object's own
`prepare` and `generate`; `Model` (in-process) and `RemoteModel` (in a supervised child process)
share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from r7b.errors import R7BError

from .parse import ParsedOutput, to_assistant_message
from .request import ChatRequest, PreparedPrompt


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class ChatResult:
    """What one assistant turn produced."""

    text: str
    thinking: str | None
    tool_calls: list[dict]
    citations: list
    finish_reason: str
    usage: Usage
    raw: str
    malformed: bool = False
    error: str | None = None
    parsed: ParsedOutput | None = field(default=None, repr=False)
    logprobs: list[dict] | None = None  # with logprobs asked for: OpenAI's `logprobs.content` entries
    choices: list["ChatResult"] = field(default_factory=list, repr=False)  # n > 1: every answer; this is the
    # first, with usage counting them all

    def message(self) -> dict:
        """The assistant message to append to the conversation."""
        return to_assistant_message(self.parsed)


@dataclass
class Done:
    """Last streaming event: the full result, equal to what `stream=False` returns."""

    result: ChatResult


@dataclass
class Choice:
    """With n > 1, opens answer `index`: the events up to the next `Choice` (or `Done`) are that answer's."""

    index: int


@dataclass
class TokenLogprob:
    """With logprobs asked for, comes before the events of each generated (non-control) token.

    `entry` is in OpenAI's shape: {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}.
    """

    entry: dict


def final_result(events: Iterator[object]) -> ChatResult:
    """The result at the end of an event stream."""
    for event in events:
        if isinstance(event, Done):
            return event.result
    raise AssertionError("generation ended without a result")


class TurnAPI:
    """`chat` for any object with `prepare(request)` and `generate(prompt, sampling)`."""

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        raise NotImplementedError

    def generate(self, prompt: PreparedPrompt, sampling: dict[str, Any]) -> Iterator[object]:
        raise NotImplementedError

    def chat(self, messages: Sequence[dict], tools: list | None = None, documents: list | None = None, *,
             stream: bool = False, max_tokens: int = 512, temperature: float = 0.3, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: Sequence[str] | str | None = None,
             mode: str | None = None, safety: str | None = None, template: str = "auto",
             enable_citations: bool | None = None, grammar: str | None = None, tool_choice: str = "auto",
             response_format: dict | None = None, constrain_tools: bool = False, n: int = 1,
             logprobs: bool = False, top_logprobs: int = 0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
             dry_multiplier: float = 0.0, dry_base: float = 1.75, dry_allowed_length: int = 2,
             dry_penalty_last_n: int = 64, dry_sequence_breakers: Sequence[str] | None = None,
             logit_bias: dict[int, float] | None = None, ignore_eos: bool = False,
             ) -> ChatResult | Iterator[object]:
        """One assistant turn. With stream=True, yields parser events and finally `Done(result)`.

        `tool_choice` ("auto", "none", "required" or a tool's name) and `response_format`
        ({"schema": ...}) are enforced with a grammar; `constrain_tools` holds any tool call to
        the tools' schemas without forcing one.

        As llama-server: `frequency_penalty`, `presence_penalty`, `repeat_penalty` over the last
        `repeat_last_n` tokens, and DRY (`dry_multiplier` > 0 turns it on). `n` > 1 (at most 4)
        samples that many answers from the one prompt evaluation, answer i with `seed + i`: the
        result is the first, with all of them in `.choices` (a stream marks each with `Choice`).
        `logprobs` fills `result.logprobs` with each token's log-probability (softmax of the raw
        logits) and its `top_logprobs` likeliest alternatives; a stream sends `TokenLogprob` events.
        `logit_bias` ({token id: -100 to 100}) is added to the logits before sampling; `ignore_eos`
        bans the tokens that end the turn, so the answer runs to `max_tokens`.
        """
        if max_tokens < 1:
            raise R7BError("max_tokens must be at least 1")
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "seed": seed,
                    "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty,
                    "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n,
                    "dry_multiplier": dry_multiplier, "dry_base": dry_base, "dry_allowed_length": dry_allowed_length,
                    "dry_penalty_last_n": dry_penalty_last_n}
        if dry_sequence_breakers is not None:
            sampling["dry_sequence_breakers"] = tuple(dry_sequence_breakers)
        if logit_bias:
            sampling["logit_bias"] = tuple((int(t), float(b)) for t, b in logit_bias.items())
        if ignore_eos:
            sampling["ignore_eos"] = True
        request = ChatRequest(
            messages=list(messages), tools=tools, documents=documents, citations=enable_citations,
            tool_choice=tool_choice, response_format=response_format, grammar=grammar,
            constrain_tools=constrain_tools, max_tokens=max_tokens, sampling=sampling,
            stop=[stop] if isinstance(stop, str) else list(stop or []), template=template, mode=mode, safety=safety,
            n=n, logprobs=top_logprobs if logprobs else None)
        events = self.generate(self.prepare(request), request.sampling)
        if stream:
            return events
        return final_result(events)
