"""The engine's thread: it steps while there is work, expires idle sessions, and
stops, drains or dies on behalf of every call in flight.

It shares the engine's lock: the bookkeeping of a step and every call from the event
loop take it, the device's work runs without it (``stepping``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from salience_server.engine.errors import Code, SalienceError, device_lost, shutting_down
from salience_server.engine.outcomes import Outcomes
from salience_server.engine.scheduler import Scheduler
from salience_server.engine.session_table import SessionTable

log = logging.getLogger(__name__)

_EXPIRY_PERIOD_S = 0.25


class EngineThread:
    def __init__(
        self,
        lock: threading.Condition,
        scheduler: Scheduler,
        session_table: SessionTable,
        outcomes: Outcomes,
        step: Callable[[], None],
        session_ttl_s: float,
        device: torch.device | None = None,
    ) -> None:
        """``device``: the model's; on CUDA the thread makes it its current device (each
        thread's starts as GPU 0, where pinned memory for the step's inputs would make
        a context of a few hundred MB for a model on another GPU)."""
        self._device = device
        self._lock = lock
        self.scheduler = scheduler
        self.session_table = session_table
        self.outcomes = outcomes
        self._step = step
        self.session_ttl_s = session_ttl_s
        self.is_stopping = False
        self.is_draining = False
        self.death: BaseException | None = None
        """What killed the thread, if it died; every call is then UNAVAILABLE."""
        self.on_death: Callable[[], None] | None = None
        """Called (from the dying thread) when the thread dies."""
        self._thread = threading.Thread(target=self._loop, name="salience-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drain(self, grace_s: float) -> int:
        """Refuses new work (UNAVAILABLE) and waits up to ``grace_s`` for the calls in
        flight to end; how many are still in flight then (0: they all ended)."""
        with self._lock:
            self.is_draining = True
            self._lock.wait_for(lambda: not self.scheduler.has_work(), timeout=grace_s)
            return len(self.scheduler.requests())

    def stop(self) -> None:
        """Fails every pending request with UNAVAILABLE, stops the loop, and gives their
        sessions back (a call waiting for one is then refused at once, UNAVAILABLE)."""
        with self._lock:
            self.is_stopping = True
            for request in self.scheduler.requests():
                request.sink(shutting_down())
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within 30 s; its sessions stay busy")
            return
        with self._lock:
            self._release_all()

    def check_alive(self) -> None:
        """UNAVAILABLE (ENGINE_FAILED) after the thread died."""
        if self.death is not None:
            raise SalienceError(
                Code.UNAVAILABLE, "ENGINE_FAILED", f"the engine stopped: {self.death!r}"
            )

    def check_serving(self) -> None:
        """UNAVAILABLE while stopping or draining, or after the thread died."""
        self.check_alive()
        if self.is_stopping or self.is_draining:
            raise shutting_down()

    def _loop(self) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            self._serve()
        except BaseException as error:  # the thread must not die silently
            log.critical("the engine thread died", exc_info=True)
            self._die(error)

    def _serve(self) -> None:
        next_expiry = 0.0
        while True:
            with self._lock:
                while True:
                    if time.monotonic() >= next_expiry:  # also while busy
                        self.session_table.expire(self.session_ttl_s)
                        next_expiry = time.monotonic() + _EXPIRY_PERIOD_S
                    if self.is_stopping or self.scheduler.has_work():
                        break
                    self._lock.wait(timeout=_EXPIRY_PERIOD_S)
                if self.is_stopping:
                    return
            try:
                self._step()
            except Exception as error:
                if device_lost(error):
                    raise  # the thread dies: every call UNAVAILABLE, health NOT_SERVING
                log.exception("engine step failed")
                with self._lock:
                    self.outcomes.fail_running()
            if self.is_draining:
                with self._lock:
                    self._lock.notify_all()  # drain() waits for the work to end

    def _die(self, error: BaseException) -> None:
        """The thread is dying: every call in flight and to come is UNAVAILABLE."""
        with self._lock:
            self.death = error
            for request in self.scheduler.requests():
                request.sink(SalienceError(Code.UNAVAILABLE, "ENGINE_FAILED", "the engine stopped"))
            self._release_all()
        if self.on_death is not None:
            self.on_death()

    def _release_all(self) -> None:
        """Under the lock, with the loop ended: gives every request's session back."""
        for request in self.scheduler.requests():
            self.outcomes.release(request)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self._lock.notify_all()
