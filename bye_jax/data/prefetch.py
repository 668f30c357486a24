"""Run an iterator on a background thread (image decoding while the device computes)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Yields `items` produced on a daemon thread, at most `depth` ahead; the producer's exceptions
    are re-raised in the consumer, and closing the consumer early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
