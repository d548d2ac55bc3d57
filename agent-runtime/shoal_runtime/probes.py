"""Liveness, readiness and /metrics over a deliberately tiny HTTP/1.0 server on asyncio.

A framework would be a dependency for three GET routes; kubelet probes and Prometheus
scrapes need nothing more than a status line and a body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

Route = Callable[[], tuple[int, str, bytes]]

REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


class ProbeServer:
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._servers: list[asyncio.Server] = []

    async def listen(self, port: int, host: str = "0.0.0.0") -> int:
        server = await asyncio.start_server(self._serve, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            route = self.routes.get(path)
            status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            head = (
                f"HTTP/1.0 {status} {REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
