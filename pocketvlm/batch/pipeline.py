"""A bounded two-stage pipeline: a background thread prepares items (reads and decodes images) while the
caller's thread runs the model on the ones before them. At most ``depth`` prepared items wait, so memory stays
bounded however long the input is. Image decoding (PIL) and torch release the GIL, so one thread is enough
to keep the model fed on a small CPU.
"""
from __future__ import annotations

import queue
import threading
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


def prefetch(items: Iterable[T], fn: Callable[[T], R], depth: int = 8) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed ``depth`` items ahead in a thread. An exception raised
    by ``fn`` (or by the iteration) is raised here, at its item's place."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                try:
                    out = (fn(item), None)
                except BaseException as e:  # handed to the consumer, who decides
                    out = (None, e)
                if not put(out) or out[1] is not None:
                    return
        except BaseException as e:
            put((None, e))
            return
        put((_END, None))

    t = threading.Thread(target=work, name="pocketvlm-prefetch", daemon=True)
    t.start()
    try:
        while True:
            value, err = q.get()
            if err is not None:
                raise err
            if value is _END:
                return
            yield value
    finally:
        stop.set()  # the consumer stopped early (an error, Ctrl-C, a break): let the thread end
        t.join(timeout=5)


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of ``n`` consecutive items (the last one shorter)."""
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch
