"""uvicorn, with a clean exit after a graceful SIGTERM/SIGINT shutdown."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after shutting down, which makes a clean stop exit with -15;
        # a finished graceful shutdown is a success.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


# Seconds an idle kept-alive connection stays open. Longer than the router keeps idle connections
# (deploy/haproxy/router.cfg.template: half of them closed every 5 s, clients' after 60 s), so the proxy
# closes an idle connection first and rarely sends a request on one the server is closing (uvicorn's
# default, 5 s, raced a 60 s proxy all the time).
KEEP_ALIVE_S = 75


def run_http(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    """Serve until SIGTERM: stop accepting, let in-flight requests finish (up to the timeout), exit 0."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=int(shutdown_timeout))
    _Server(config).run()
