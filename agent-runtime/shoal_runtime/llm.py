"""The built-in ``handler.llm``: one task (or one batch) becomes one chat completion.

The Agent spec names an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, LiteLLM, ...);
:class:`LlmChat` is a handler like any user-written one, so retries, budgets, caching
and escalation in the runtime treat both the same way. The design in short:

* One ``httpx.AsyncClient`` per handler, so concurrent tasks share pooled connections.
* The input goes in as the user message: a string as is, anything else as canonical
  JSON. The reply comes back as JSON when it is JSON (models like wrapping it in a
  markdown fence, which is stripped), else as ``{"text": ...}``, so every output is a
  JSON value a contract can check.
* Failures map onto the SDK's errors, which steer the runtime: 429, 5xx and transport
  failures are :class:`RetryableError` (429 carries Retry-After), other 4xx are
  :class:`PermanentError`, because resending the same request cannot fix them.
* Token usage, priced with ``spec.pricing`` in :class:`~decimal.Decimal`, and a
  ``confidence`` field of the output are reported on the context, where budgets and
  escalation pick them up.
* :meth:`LlmChat.batch` packs many inputs into one request that asks for a JSON array
  of as many results, in order; that saves the system prompt and the per-request
  overhead for each task after the first.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

import httpx

from shoal_api.agent import LlmHandler
from shoal_api.envelope import canonical_json
from shoal_runtime.sdk import Context, PermanentError, RetryableError

BATCH_INSTRUCTION = (
    "The user message is a JSON array of {n} independent inputs. Handle each one as if "
    "it came alone and answer with only a JSON array of exactly {n} results, the i-th "
    "result for the i-th input, in the same order."
)

# Enough of an error body to see the provider's reason without flooding logs.
_BODY_LIMIT = 500

_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n(.*?)\n?[ \t]*```\s*$", re.DOTALL)


def parse_content(content: str) -> Any:
    """The model's answer as JSON when it is JSON (fence stripped), else ``{"text": ...}``."""
    fenced = _FENCE.match(content)
    text = fenced.group(1) if fenced else content
    try:
        return json.loads(text)
    except ValueError:
        return {"text": content}


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare from model APIs and ignored."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class LlmChat:
    """A handler that sends each input to a chat completions endpoint."""

    def __init__(
        self,
        spec: LlmHandler,
        api_key: str | None,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.spec = spec
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self.timeout = timeout
        # Keys read from mounted Secret files often end in a newline, which is not
        # allowed in a header.
        key = (api_key or "").strip()
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=timeout)

    async def __call__(self, input: Any, ctx: Context) -> Any:
        output = await self._complete(self.spec.system_prompt, _user_content(input), ctx)
        confidence = output.get("confidence") if isinstance(output, dict) else None
        if (
            isinstance(confidence, int | float)
            and not isinstance(confidence, bool)
            and 0.0 <= confidence <= 1.0
        ):
            ctx.report_confidence(float(confidence))
        return output

    async def batch(self, inputs: list[Any], ctx: Context) -> list[Any]:
        if not inputs:
            return []
        instruction = BATCH_INSTRUCTION.format(n=len(inputs))
        system = (
            f"{self.spec.system_prompt}\n\n{instruction}"
            if self.spec.system_prompt
            else instruction
        )
        output = await self._complete(system, canonical_json(inputs), ctx)
        if not isinstance(output, list) or len(output) != len(inputs):
            got = f"{len(output)} results" if isinstance(output, list) else type(output).__name__
            raise RetryableError(f"batch of {len(inputs)} answered with {got}")
        return output

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _complete(self, system: str, user: str, ctx: Context) -> Any:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        body = {
            "model": self.spec.model,
            "messages": messages,
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
        }
        try:
            response = await self._client.post(
                self.url, json=body, headers=self._headers, timeout=self.timeout
            )
        except httpx.TimeoutException as exc:
            raise RetryableError(f"{self.url}: timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        _raise_for_status(response)
        try:
            reply = response.json()
        except ValueError as exc:
            raise RetryableError(f"malformed response (not JSON): {_snippet(response)}") from exc
        # Tokens were spent even if the content below turns out unusable.
        self._report_usage(reply, ctx)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise RetryableError(
                f"malformed response (no choices[0].message.content): {_snippet(response)}"
            )
        return parse_content(content)

    def _report_usage(self, reply: Any, ctx: Context) -> None:
        usage = reply.get("usage") if isinstance(reply, dict) else None
        if not isinstance(usage, dict):
            return
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        cost = None
        if (pricing := self.spec.pricing) is not None:
            cost = (
                Decimal(prompt) * pricing.input_per_1k_tokens
                + Decimal(completion) * pricing.output_per_1k_tokens
            ) / 1000
        ctx.report_usage(prompt, completion, cost)


def _user_content(input: Any) -> str:
    return input if isinstance(input, str) else canonical_json(input)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _snippet(response: httpx.Response) -> str:
    text = response.text
    return text if len(text) <= _BODY_LIMIT else text[:_BODY_LIMIT] + "..."


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"HTTP {status} from {response.request.url}: {_snippet(response)}"
    if status == 429:
        raise RetryableError(message, retry_after_seconds(response.headers.get("Retry-After")))
    # 408: the server gave up waiting for the request, which a new attempt can fix.
    if status >= 500 or status == 408:
        raise RetryableError(message)
    # Other 4xx, and 3xx (httpx follows no redirects, so a moved base URL shows up here).
    raise PermanentError(message)
