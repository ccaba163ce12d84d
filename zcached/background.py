"""background: the daemon thread that a periodic part of the server runs in.

Owns: starting one daemon thread for a part (the recompressor, the writeback thread), running
the caller's per-thread set-up in it first (PR_SET_IO_FLUSHER in the server), the stop event
the part's loop waits on, and joining the thread when asked to stop.
Must not: know what the loop does, or restart a stopped thread (the compactor, which is
restarted, keeps its own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundThread:
    """Runs :meth:`_run` in a daemon thread named ``name`` between :meth:`start` and
    :meth:`stop`; ``_run`` returns once ``self._stop`` is set."""

    def __init__(self, name: str, thread_init: Callable[[], None] | None = None) -> None:
        self._name = name
        self._thread_init = thread_init
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        self._run()

    def _run(self) -> None:
        raise NotImplementedError
