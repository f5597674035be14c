"""A faithful, offline emulator of Anthropic's Message Batches and Messages API.

    from batchrun.emulator import Emulator, EmulatorConfig, serve_in_thread, run_server
    emu = Emulator(EmulatorConfig(processing_seconds=0.05))   # an ASGI app
    handle = serve_in_thread(emu)                              # uvicorn on loopback, a free port
    handle.base_url                                            # "http://127.0.0.1:54321"
    httpx.Client(base_url="http://emu", transport=emu.sync_transport())   # in process
    emu.config.fault_rate = 0.2                                # knobs take effect at once
    emu.stats.batches_created, emu.stats.submitted_custom_ids  # counters
    emu.reset(); handle.stop()

Endpoints: everything in docs/anthropic-batches-api.md (batches create / retrieve / list / cancel /
delete / results, POST /v1/messages, /v1/messages/count_tokens), also under a gateway prefix
(``/anything/v1/...``), plus control endpoints that need no key: ``GET /_emulator/stats``,
``GET|POST /_emulator/config`` (partial JSON update), ``POST /_emulator/reset``.

Replies are deterministic functions of the request params: see `batchrun.emulator.replies`.
"""
from .app import DroppedConnection, Emulator
from .config import EmulatorConfig, EmulatorStats
from .server import ServerHandle, run_server, serve_in_thread
from .transport import SyncASGITransport

__all__ = ["Emulator", "EmulatorConfig", "EmulatorStats", "serve_in_thread", "run_server", "ServerHandle",
           "SyncASGITransport", "DroppedConnection"]
