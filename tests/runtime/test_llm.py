"""The built-in LLM handler against a real HTTP server on loopback (tests/openai_stub.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from shoal_api.agent import LlmHandler
from shoal_runtime.llm import BATCH_INSTRUCTION, LlmChat
from shoal_runtime.sdk import Context, PermanentError, RetryableError
from tests.openai_stub import OpenAIStub, Reply, completion, error, rate_limited


@dataclass
class RecordingContext(Context):
    usage_calls: list[tuple[int, int, Decimal | str | None]] = field(default_factory=list)

    def report_usage(
        self, input_tokens: int = 0, output_tokens: int = 0, cost: Decimal | str | None = None
    ) -> None:
        self.usage_calls.append((input_tokens, output_tokens, cost))
        super().report_usage(input_tokens, output_tokens, cost)


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as server:
        yield server


def spec(base_url: str, **fields: Any) -> LlmHandler:
    return LlmHandler.model_validate({"baseURL": base_url, "model": "test-model", **fields})


def new_ctx() -> RecordingContext:
    return RecordingContext(task_id="t-1", agent="classifier", namespace="default")


def call(
    handler_spec: LlmHandler,
    input: Any,
    ctx: Context | None = None,
    *,
    api_key: str | None = None,
    timeout: float = 5.0,
) -> Any:
    async def go() -> Any:
        chat = LlmChat(handler_spec, api_key, timeout=timeout)
        try:
            return await chat(input, ctx or new_ctx())
        finally:
            await chat.aclose()

    return asyncio.run(go())


def call_batch(handler_spec: LlmHandler, inputs: list[Any], ctx: Context) -> list[Any]:
    async def go() -> list[Any]:
        chat = LlmChat(handler_spec, None)
        try:
            return await chat.batch(inputs, ctx)
        finally:
            await chat.aclose()

    return asyncio.run(go())


# --- output parsing ------------------------------------------------------------------


def test_json_output_is_returned_parsed(stub: OpenAIStub) -> None:
    stub.push(completion('{"category": "billing", "urgent": true}'))
    assert call(spec(stub.base_url), "my bill") == {"category": "billing", "urgent": True}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ("```\n[1, 2]\n```", [1, 2]),
        ('  ```JSON\n{"a": "```"}\n```\n', {"a": "```"}),
    ],
)
def test_fenced_json_output_is_unwrapped(stub: OpenAIStub, content: str, expected: Any) -> None:
    stub.push(completion(content))
    assert call(spec(stub.base_url), "x") == expected


@pytest.mark.parametrize(
    "content",
    [
        "Hello, how can I help?",
        # A fence inside prose is the model talking, not a bare answer.
        'Here it is:\n```json\n{"a": 1}\n```',
        "```json\n{not json}\n```",
    ],
)
def test_text_output_is_wrapped(stub: OpenAIStub, content: str) -> None:
    stub.push(completion(content))
    assert call(spec(stub.base_url), "x") == {"text": content}


# --- request shape -------------------------------------------------------------------


def test_request_with_key_system_prompt_and_json_input(stub: OpenAIStub) -> None:
    stub.push(completion("{}"))
    handler = spec(
        stub.base_url + "/",
        systemPrompt="Classify the ticket.",
        temperature=0.7,
        maxTokens=64,
    )
    # A key read from a Secret file often ends in a newline.
    call(handler, {"b": 1, "a": "café"}, api_key="sk-test\n")

    [request] = stub.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Classify the ticket."},
            {"role": "user", "content": '{"a":"café","b":1}'},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
    }


def test_request_without_key_or_system_prompt_sends_string_input_as_is(
    stub: OpenAIStub,
) -> None:
    stub.push(completion("{}"))
    call(spec(stub.base_url), '{"looks": "like json"}')

    [request] = stub.requests
    assert "authorization" not in request.headers
    assert request.body["messages"] == [{"role": "user", "content": '{"looks": "like json"}'}]
    assert request.body["temperature"] == 0.0
    assert request.body["max_tokens"] == 1024


def test_calls_share_one_pooled_connection(stub: OpenAIStub) -> None:
    stub.push(completion("{}"), completion("{}"))

    async def go() -> None:
        chat = LlmChat(spec(stub.base_url), None)
        try:
            await chat("one", new_ctx())
            await chat("two", new_ctx())
        finally:
            await chat.aclose()

    asyncio.run(go())
    first, second = stub.requests
    assert first.client_port == second.client_port


def test_a_given_client_is_used_and_left_open(stub: OpenAIStub) -> None:
    stub.push(completion('{"ok": true}'))

    async def go() -> tuple[Any, bool]:
        async with httpx.AsyncClient() as client:
            chat = LlmChat(spec(stub.base_url), None, client=client)
            output = await chat("x", new_ctx())
            await chat.aclose()
            return output, client.is_closed

    assert asyncio.run(go()) == ({"ok": True}, False)


# --- usage and confidence ------------------------------------------------------------


def test_usage_and_cost_are_reported_in_decimal(stub: OpenAIStub) -> None:
    stub.push(completion("{}", prompt_tokens=1001, completion_tokens=333))
    handler = spec(
        stub.base_url,
        pricing={"inputPer1kTokens": "0.0003", "outputPer1kTokens": "0.0007"},
    )
    ctx = new_ctx()
    call(handler, "x", ctx)

    # 1001 * 0.0003 / 1000 + 333 * 0.0007 / 1000, exactly (floats would drift).
    expected = Decimal("0.0005334")
    [(input_tokens, output_tokens, cost)] = ctx.usage_calls
    assert (input_tokens, output_tokens) == (1001, 333)
    assert isinstance(cost, Decimal)
    assert cost == expected
    assert (ctx.input_tokens, ctx.output_tokens, ctx.cost) == (1001, 333, expected)


def test_usage_without_pricing_has_no_cost(stub: OpenAIStub) -> None:
    stub.push(completion("{}", prompt_tokens=12, completion_tokens=5))
    ctx = new_ctx()
    call(spec(stub.base_url), "x", ctx)
    assert ctx.usage_calls == [(12, 5, None)]
    assert ctx.tokens == 17


def test_confidence_is_reported_and_kept_in_the_output(stub: OpenAIStub) -> None:
    stub.push(completion('{"label": "spam", "confidence": 0.8}'))
    ctx = new_ctx()
    assert call(spec(stub.base_url), "x", ctx) == {"label": "spam", "confidence": 0.8}
    assert ctx.confidence == 0.8


@pytest.mark.parametrize("confidence", ["1.5", "-0.1", '"0.9"', "true", "null"])
def test_confidence_outside_the_rules_is_not_reported(stub: OpenAIStub, confidence: str) -> None:
    stub.push(completion(f'{{"label": "spam", "confidence": {confidence}}}'))
    ctx = new_ctx()
    call(spec(stub.base_url), "x", ctx)
    assert ctx.confidence is None


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0.5", 0.5), ("Wed, 21 Oct 2015 07:28:00 GMT", None), (None, None)],
)
def test_429_is_retryable_with_retry_after(
    stub: OpenAIStub, header: str | None, expected: float | None
) -> None:
    stub.push(rate_limited(header))
    with pytest.raises(RetryableError, match="429") as caught:
        call(spec(stub.base_url), "x")
    assert caught.value.retry_after == expected


# 408: the server gave up waiting for the request; a new attempt can succeed.
@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_5xx_and_408_are_retryable(stub: OpenAIStub, status: int) -> None:
    stub.push(error(status, "overloaded"))
    with pytest.raises(RetryableError, match=str(status)) as caught:
        call(spec(stub.base_url), "x")
    assert caught.value.retry_after is None


# 301: httpx follows no redirects, so a moved base URL is a configuration error.
@pytest.mark.parametrize("status", [400, 401, 404, 422, 301])
def test_other_4xx_is_permanent_with_status_and_body(stub: OpenAIStub, status: int) -> None:
    stub.push(error(status, "model not found"))
    with pytest.raises(PermanentError, match=f"{status}.*model not found"):
        call(spec(stub.base_url), "x")


def test_error_body_is_truncated(stub: OpenAIStub) -> None:
    stub.push(error(400, "x" * 10_000))
    with pytest.raises(PermanentError) as caught:
        call(spec(stub.base_url), "x")
    assert 400 < len(str(caught.value)) < 1000


def test_read_timeout_is_retryable(stub: OpenAIStub) -> None:
    stub.push(completion("{}", delay=30))
    started = time.monotonic()
    with pytest.raises(RetryableError, match="timed out"):
        call(spec(stub.base_url), "x", timeout=0.2)
    assert time.monotonic() - started < 10
    assert len(stub.requests) == 1


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    with pytest.raises(RetryableError, match="ConnectError"):
        call(spec(f"http://127.0.0.1:{port}/v1"), "x")


@pytest.mark.parametrize(
    "body",
    [
        {"choices": []},
        {"choices": [{"message": {"role": "assistant", "content": None}}]},
        {"choices": [{"text": "legacy completion"}]},
        {"error": "no choices"},
        "just a string",
    ],
)
def test_malformed_200_is_retryable(stub: OpenAIStub, body: Any) -> None:
    stub.push(Reply(status=200, body=body))
    with pytest.raises(RetryableError, match="malformed response"):
        call(spec(stub.base_url), "x")


# --- batches -------------------------------------------------------------------------


def test_batch_is_one_request_with_results_in_order(stub: OpenAIStub) -> None:
    stub.push(
        completion(
            '```json\n[{"n": 1}, {"n": 2}, {"n": 3}]\n```',
            prompt_tokens=90,
            completion_tokens=30,
        )
    )
    ctx = new_ctx()
    handler = spec(stub.base_url, systemPrompt="Count.")
    inputs = [{"id": "a"}, "plain", 3]
    assert call_batch(handler, inputs, ctx) == [{"n": 1}, {"n": 2}, {"n": 3}]

    [request] = stub.requests
    system, user = request.body["messages"]
    assert system == {
        "role": "system",
        "content": "Count.\n\n" + BATCH_INSTRUCTION.format(n=3),
    }
    assert "exactly 3 results" in system["content"]
    assert user == {"role": "user", "content": '[{"id":"a"},"plain",3]'}
    assert ctx.usage_calls == [(90, 30, None)]


@pytest.mark.parametrize("content", ['[{"n": 1}, {"n": 2}]', '{"n": 1}', "three results"])
def test_batch_with_the_wrong_shape_is_retryable(stub: OpenAIStub, content: str) -> None:
    stub.push(completion(content, prompt_tokens=40, completion_tokens=9))
    ctx = new_ctx()
    with pytest.raises(RetryableError, match="batch of 3"):
        call_batch(spec(stub.base_url), [1, 2, 3], ctx)
    # The tokens were spent all the same, and budgets must see them.
    assert ctx.tokens == 49


def test_empty_batch_makes_no_request(stub: OpenAIStub) -> None:
    assert call_batch(spec(stub.base_url), [], new_ctx()) == []
    assert stub.requests == []
