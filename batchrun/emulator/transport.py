"""Running the emulator in process: an httpx transport that calls the ASGI app directly, for fast tests
(`Emulator.sync_transport()`). Over a real socket, see server.py."""
from __future__ import annotations

import asyncio
import threading
from typing import Optional

import httpx


class _LoopThread:
    """A private asyncio loop in a daemon thread, to run ASGI calls for sync callers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="batchrun-emulator-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


_loop_lock = threading.Lock()


def loop_for(app) -> _LoopThread:
    with _loop_lock:
        runner = getattr(app, "_loop_runner", None)
        if runner is None:
            runner = _LoopThread()
            try:
                app._loop_runner = runner
            except AttributeError:  # pragma: no cover
                pass
        return runner


class _ReplayStream(httpx.SyncByteStream):
    def __init__(self, chunks: list, error: Optional[BaseException]):
        self.chunks, self.error = chunks, error

    def __iter__(self):
        yield from self.chunks
        if self.error is not None:
            raise httpx.RemoteProtocolError(f"peer closed connection without sending complete message body "
                                            f"({self.error})")


class SyncASGITransport(httpx.BaseTransport):
    """Runs an ASGI app for a sync httpx.Client, on a private event loop (one per app).

    The reply is collected whole, then handed over; a connection the app drops mid-reply surfaces
    as httpx.RemoteProtocolError while the body is read, as over a real socket.
    """

    def __init__(self, app, client: tuple = ("127.0.0.1", 50000)):
        self.app = app
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        url = request.url
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?")[0],
            "query_string": url.query,
            "root_path": "",
            "server": (url.host, url.port or (443 if url.scheme == "https" else 80)),
            "client": self.client,
        }
        status, headers, chunks, error = loop_for(self.app).run(run_app(self.app, scope, body))
        if status is None:
            if isinstance(error, httpx.TransportError):
                raise httpx.RemoteProtocolError(str(error), request=request) from error
            raise error
        return httpx.Response(status, headers=headers, stream=_ReplayStream(chunks, error), request=request)


async def run_app(app, scope: dict, body: bytes) -> tuple:
    state = {"status": None, "headers": [], "delivered": False}
    chunks: list = []

    async def receive():
        if not state["delivered"]:
            state["delivered"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            state["status"] = message["status"]
            state["headers"] = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            data = message.get("body", b"")
            if data:
                chunks.append(data)

    try:
        await app(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
        return state["status"], state["headers"], chunks, exc
    return state["status"], state["headers"], chunks, None
