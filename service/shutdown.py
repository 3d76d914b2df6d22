"""The API's shutdown signal, for responses that would otherwise hold it open.

uvicorn waits for open connections to finish before it stops, and a server-sent event
stream of a running job finishes only when the job does. ``slidepipe serve`` runs
uvicorn through :func:`run_server`, whose server sets :data:`SHUTTING_DOWN` on SIGTERM or
SIGINT; event streams look at it on every poll and close (the client's EventSource
reconnects to the next server after ``retry``).
"""

from __future__ import annotations

import threading
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

#: Set once the server was asked to stop.
SHUTTING_DOWN = threading.Event()
#: Seconds uvicorn gives other open responses (a long ZIP download) before it cuts them.
GRACEFUL_SHUTDOWN_S = 30


def run_server(config: uvicorn.Config) -> None:
    """``uvicorn.Server(config).run()``, with :data:`SHUTTING_DOWN` set on a stop signal."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            SHUTTING_DOWN.set()
            super().handle_exit(sig, frame)

    if config.timeout_graceful_shutdown is None:
        config.timeout_graceful_shutdown = GRACEFUL_SHUTDOWN_S
    _Server(config).run()
