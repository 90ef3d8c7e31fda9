"""Closing or reloading a browser tab stops the job that tab started.

Gradio runs a job's function in a worker thread it cannot interrupt: when the tab goes away it
only stops listening, and the abandoned job keeps its place in the shared queue until it ends.
So each job records its session under the tab's Gradio session hash while it runs, and the
app's `unload` handler asks that session to stop. The prune, sweep or evaluation then ends at
its next block, point or batch, the model gets its dense weights back, and the queue moves on.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    busy: str

    def request_stop(self) -> None: ...


class TabJobs:
    """The session each open tab is running a job on, by tab (Gradio session hash)."""

    def __init__(self, remember_closed: int = 4096):
        self._lock = threading.Lock()
        self._running: dict[str, Stoppable] = {}
        # a tab can close between its job leaving the queue and the job registering here
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._remember_closed = remember_closed

    @contextmanager
    def running(self, tab: str | None, session: Stoppable) -> Iterator[None]:
        """Register `session` as running the job of `tab` for the duration of the block."""
        if not tab:
            yield
            return
        with self._lock:
            self._running[tab] = session
            closed = tab in self._closed
        if closed:
            session.request_stop()
        try:
            yield
        finally:
            with self._lock:
                if self._running.get(tab) is session:
                    del self._running[tab]

    def close(self, tab: str | None) -> bool:
        """The tab is gone: stop its running job, if any. True when a job was asked to stop."""
        if not tab:
            return False
        with self._lock:
            self._closed[tab] = None
            while len(self._closed) > self._remember_closed:
                self._closed.popitem(last=False)
            session = self._running.pop(tab, None)
        if session is None:
            return False
        log.info("a browser tab closed while %s: stopping it", session.busy or "its job ran")
        session.request_stop()
        return True

    def jobs(self) -> dict[str, Stoppable]:
        """{tab: session} of the jobs running now."""
        with self._lock:
            return dict(self._running)
