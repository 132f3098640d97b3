"""Running a service: consume loops in background threads beside a uvicorn HTTP server."""

from __future__ import annotations

import logging
import threading

import uvicorn
from fastapi import FastAPI

from shared.kafka import ConsumeLoop
from shared.settings import ServiceSettings

log = logging.getLogger(__name__)


class LoopThreads:
    """Starts consume loops in daemon threads; stops them within the shutdown grace."""

    def __init__(self) -> None:
        self._loops: list[tuple[ConsumeLoop, threading.Thread]] = []

    def start(self, loop: ConsumeLoop) -> ConsumeLoop:
        thread = threading.Thread(target=self._run, args=(loop,), name=f"loop-{loop.topic.name}", daemon=True)
        self._loops.append((loop, thread))
        thread.start()
        return loop

    @staticmethod
    def _run(loop: ConsumeLoop) -> None:
        try:
            loop.run()
        except Exception:  # noqa: BLE001 - a dead loop must be visible, not silent
            log.exception("consume loop for %s died", loop.topic.name)
            loop.crashed = True

    @property
    def healthy(self) -> bool:
        return all((thread.is_alive() or loop.stopping) and not loop.crashed for loop, thread in self._loops)

    def stop(self, timeout_s: float) -> None:
        for loop, _ in self._loops:
            loop.stop()
        for _, thread in self._loops:
            thread.join(timeout_s + 5)


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run `app` until SIGTERM/SIGINT; its lifespan starts and stops the loops."""
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level=settings.log.level.lower(),
                timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1, log_config=None)
