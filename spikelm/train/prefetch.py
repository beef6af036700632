"""A background thread that produces training batches ahead of the training step (docs/design.md, "Loaders").

``Prefetcher(produce, depth)`` calls ``produce()`` over and over in one daemon thread and keeps up to ``depth``
results in a queue; ``get()`` hands them to the training thread in order. One producer thread keeps the order, so
prefetching never changes the data. An exception in ``produce()`` is re-raised by the next ``get()`` in the training
thread (the same exception object: its type and message are the original's). ``close()`` stops the thread; it
never hangs: the producer waits on a full queue with a timeout and checks the stop flag, and being a daemon it
cannot keep the process alive. Tokenisation (the Rust tokenizer) and file reads release the GIL, so the work
overlaps the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_POLL_S = 0.1


class Prefetcher:
    """``produce()``'s results, ``depth`` ahead, from a daemon thread."""

    def __init__(self, produce: Callable[[], Any], depth: int, *, name: str = "spikelm-data") -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
            raise ValueError(f"prefetch depth: expected a positive integer, got {depth!r}")
        self._produce = produce
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(("item", self._produce()))
        except BaseException as err:  # noqa: BLE001 -- handed to the training thread, which re-raises it
            self._put(("error", err))

    def _put(self, entry: tuple[str, Any]) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        """The next result; re-raises the producer's exception (and stops the thread)."""
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data prefetch thread has stopped") from None
                continue
            if kind == "error":
                self.close()
                raise value
            return value

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: it finishes the batch it is producing (if any) and exits."""
        self._stop.set()
        while True:  # free a producer blocked on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


__all__ = ["Prefetcher"]
