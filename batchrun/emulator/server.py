"""Serving the emulator: uvicorn in a thread (tests), uvicorn in the foreground (the CLI), a lean
threading HTTP server in the foreground (the CLI's timing mode). In process, without a socket: see
transport.py."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional

from .app import Emulator, install_log_filter
from .config import EmulatorConfig
from .transport import loop_for, run_app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, so asyncio sets TCP_NODELAY on accepted connections (else Nagle's algorithm
    # and delayed ACKs add ~40 ms to every reply on a kept-alive connection)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _base_url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class ServerHandle:
    """A running emulator server: `base_url`, `port`, `app`, `stop()` (also a context manager)."""

    def __init__(self, app, server, thread: threading.Thread, sock: socket.socket, base_url: str):
        self.app = app
        self.server = server
        self.thread = thread
        self.sock = sock
        self.base_url = base_url
        self.port = sock.getsockname()[1]

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app: Optional[Emulator] = None, host: str = "127.0.0.1", port: int = 0, *,
                    log_level: str = "warning") -> ServerHandle:
    """Serve `app` (an Emulator; a new default one when None) with uvicorn in a daemon thread.

    Returns once the server accepts connections. Port 0 picks a free port (see `handle.base_url`).
    """
    import uvicorn

    if app is None:
        app = Emulator()
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, log_config=None, lifespan="off", access_log=False,
                            date_header=False, timeout_graceful_shutdown=1, timeout_keep_alive=30)
    install_log_filter()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="batchrun-emulator",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the emulator server failed to start")
        if time.monotonic() > deadline:  # pragma: no cover
            raise RuntimeError("the emulator server did not start within 15 s")
        time.sleep(0.005)
    base_url = _base_url(sock, host)
    if isinstance(app, Emulator):
        app.base_url = base_url
    return ServerHandle(app, server, thread, sock, base_url)


def run_server(host: str = "127.0.0.1", port: int = 8765, config: Optional[EmulatorConfig] = None, *,
               on_ready: Optional[Callable[[str], None]] = None, log_level: str = "warning") -> None:
    """Serve a new Emulator(config) in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    app = Emulator(config)
    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                                           date_header=False, timeout_graceful_shutdown=1))
    install_log_filter()
    app.base_url = _base_url(sock, host)
    if on_ready is not None:
        on_ready(app.base_url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def run_lean_server(host: str = "127.0.0.1", port: int = 8765, config: Optional[EmulatorConfig] = None, *,
                    on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve a new Emulator(config) in the foreground with the standard library's threading HTTP server.

    For timing (`batchrun emulator --timing`): much less work per call than uvicorn, so a benchmark
    measures the client, not the server. Each call runs the same app on one private event loop
    (`SyncASGITransport`'s); a reply is sent whole, with its length. A connection the app drops
    mid-reply is cut short (its announced length not reached), as over uvicorn.
    """
    import http.server

    app = Emulator(config)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args) -> None:   # no access log
            pass

        def handle_one_request(self) -> None:
            # every method goes to the app (the base class would look for do_<METHOD>)
            try:
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline or not self.parse_request():
                    self.close_connection = True
                    return
                self._serve()
                self.wfile.flush()
            except (ConnectionError, TimeoutError):
                self.close_connection = True

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            path, _, query = self.path.partition("?")
            host_port = self.server.server_address
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.command,
                     "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()],
                     "scheme": "http", "path": path, "raw_path": path.encode("latin-1"),
                     "query_string": query.encode("latin-1"), "root_path": "",
                     "server": (host_port[0], host_port[1]), "client": self.client_address[:2]}
            status, headers, chunks, error = loop_for(app).run(run_app(app, scope, body))
            if status is None:           # dropped before any reply
                self.close_connection = True
                return
            payload = b"".join(chunks)
            length = len(payload) + (1 if error is not None else 0)   # a drop: less than announced
            head = [f"HTTP/1.1 {status} {http.server.BaseHTTPRequestHandler.responses.get(status, ('',))[0]}"]
            head += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in headers
                     if k.lower() != b"content-length"]
            head.append(f"content-length: {length}")
            if error is not None:
                head.append("connection: close")
                self.close_connection = True
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        request_queue_size = 128

    server = Server((host, port), Handler)
    install_log_filter()
    shown = f"[{host}]" if ":" in host else host
    app.base_url = f"http://{shown}:{server.server_address[1]}"
    if on_ready is not None:
        on_ready(app.base_url)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
