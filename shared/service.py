"""Running a service: consume loops in background threads beside a uvicorn HTTP server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from shared.kafka import ConsumeLoop
from shared.settings import ServiceSettings

log = logging.getLogger(__name__)


class LoopThreads:
    """Runs consume loops and worker threads in daemon threads, says which of them died (for
    `/healthz`, so the orchestrator restarts the process), and stops them within the grace."""

    def __init__(self) -> None:
        self._loops: list[tuple[ConsumeLoop, threading.Thread]] = []
        self._workers: list[threading.Thread] = []
        self._why: dict[str, str] = {}
        self.stopping = threading.Event()

    def start(self, loop: ConsumeLoop) -> ConsumeLoop:
        thread = threading.Thread(target=self._run, args=(loop,), name=f"loop-{loop.topic.name}", daemon=True)
        self._loops.append((loop, thread))
        thread.start()
        return loop

    def _run(self, loop: ConsumeLoop) -> None:
        try:
            loop.run()
        except Exception as exc:  # noqa: BLE001 - a dead loop must be visible, not silent
            log.exception("consume loop for %s died", loop.topic.name)
            self._why[threading.current_thread().name] = f"{type(exc).__name__}: {exc}"
            loop.crashed = True

    def run(self, name: str, target: Callable[[threading.Event], None]) -> None:
        """Run `target(stop)` in a daemon thread; it must return only once `stop` is set. Raising or
        returning earlier counts as dead."""
        def body() -> None:
            try:
                target(self.stopping)
            except BaseException as exc:  # noqa: BLE001 - reported by dead()
                log.exception("thread %s died", name)
                self._why[name] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=body, name=name, daemon=True)
        self._workers.append(thread)
        thread.start()

    def dead(self) -> list[str]:
        """What died and why, one line each (empty when all is well)."""
        out = [f"consume loop for {loop.topic.name} died: {self._why.get(thread.name, 'it returned')}"
               for loop, thread in self._loops if loop.crashed or not (thread.is_alive() or loop.stopping)]
        out += [f"thread {thread.name} died: {self._why.get(thread.name, 'it returned')}"
                for thread in self._workers if not thread.is_alive() and not self.stopping.is_set()]
        return out

    @property
    def healthy(self) -> bool:
        return not self.dead()

    def stop(self, timeout_s: float) -> None:
        self.stopping.set()
        for loop, _ in self._loops:
            loop.stop()
        for _, thread in self._loops:
            thread.join(timeout_s + 5)
        for thread in self._workers:
            thread.join(timeout_s + 5)


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run `app` until SIGTERM/SIGINT; its lifespan starts and stops the loops."""
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level=settings.log.level.lower(),
                timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1, log_config=None)
