"""Handler loading: turns the Agent's handler spec (a Python callable or an OpenAI-compatible
LLM) into the single and batch async callables the worker awaits."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal_api.agent import AgentSpec
from shoal_runtime.sdk import Context

AsyncHandler = Callable[[Any, Context], Awaitable[Any]]


class HandlerLoadError(RuntimeError):
    """The handler named in the spec cannot be imported or called."""


def import_callable(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerLoadError(f"handler module {module_name!r} cannot be imported: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HandlerLoadError(f"{ref!r} is not a callable in module {module_name!r}")
    return fn  # type: ignore[no-any-return]


def as_async(fn: Callable[..., Any], executor: ThreadPoolExecutor) -> AsyncHandler:
    """Coroutine functions are awaited; plain functions run in the executor so that a
    blocking SDK call does not stall the event loop (and the other tasks in flight)."""
    if inspect.iscoroutinefunction(fn):
        return fn

    async def run(input: Any, ctx: Context) -> Any:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor, functools.partial(fn, input, ctx))
        if inspect.isawaitable(result):
            result = await result
        return result

    return run


class Handlers:
    """The single and the batch entry points of the Agent's handler."""

    def __init__(self, spec: AgentSpec, api_key: str | None) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=min(spec.concurrency, 64), thread_name_prefix="handler"
        )
        self._closers: list[Callable[[], Awaitable[None]]] = []
        if spec.handler.llm is not None:
            from shoal_runtime.llm import LlmChat

            # The HTTP timeout fires just before the attempt's, so a slow endpoint reads as
            # a retryable HTTP failure rather than a generic timeout.
            http_timeout = max(0.5, spec.timeout_seconds - 0.5)
            chat = LlmChat(spec.handler.llm, api_key, timeout=http_timeout)
            self.single: AsyncHandler = chat
            self.batch: AsyncHandler = chat.batch
            self._closers.append(chat.aclose)
        elif spec.handler.python is not None:
            fn = as_async(import_callable(spec.handler.python), self.executor)
            self.single = fn
            self.batch = fn
        else:  # the CRD's CEL rule makes this unreachable for applied Agents
            raise HandlerLoadError("the Agent has no handler")

    async def close(self) -> None:
        for close in self._closers:
            await close()
        self.executor.shutdown(wait=False, cancel_futures=True)
