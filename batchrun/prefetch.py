"""Overlap one stage with the next: iterate a source in a background thread, a few chunks ahead.

Used where batchrun would otherwise wait on one thing at a time: the plan renders and stores one
block of input rows while the next block is read and parsed (pyarrow's CSV reader works without the
GIL), and a batch's results are recorded in SQLite (which steps without the GIL) while the rest of
the file downloads and its lines are parsed. Order, items and errors are the source's: an exception
the source raises is raised to the consumer at the point where it happened, after every item before
it; a consumer that stops early (an error of its own, Ctrl-C) stops the producer, and the source is
closed in the thread that iterated it.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
_END = object()


def prefetched(source: Iterable[T], *, depth: int = 2, chunk: int = 1) -> Iterator[T]:
    """The items of `source`, produced by a daemon thread at most `depth` chunks of `chunk` items ahead
    (the thread starts at the first item asked for)."""
    yield from Prefetch(source, depth=depth, chunk=chunk)


class Prefetch(Iterable[T]):
    """The items of `source`, produced by a daemon thread started at once, at most `depth` chunks of `chunk`
    items ahead of the consumer (as `prefetched`). `close()` stops the thread — the consumer is done, or
    never took any of them — and the source is closed in the thread that iterated it."""

    def __init__(self, source: Iterable[T], *, depth: int = 2, chunk: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        threading.Thread(target=self._produce, args=(source, chunk), name="batchrun-prefetch", daemon=True).start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterable[T], chunk: int) -> None:
        it = iter(source)
        buf: list = []
        try:
            for item in it:
                buf.append(item)
                if len(buf) >= chunk:
                    if not self._put(buf):
                        return
                    buf = []
            if buf and not self._put(buf):
                return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, after the items before it
            if not buf or self._put(buf):
                self._put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        """The items, once (their consumer's one pass); the thread is stopped when it ends or is closed."""
        try:
            while True:
                got = self._queue.get()
                if got is _END:
                    return
                if isinstance(got, BaseException):
                    raise got
                yield from got
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()


class Ahead:
    """`make()` run in a daemon thread while the caller does something else (batch mode renders the next
    chunk while the current batch uploads: the upload waits on the network without the GIL).

    `result()` waits for it and gives its value, or raises its exception there — where the caller would
    have called `make()` itself; `wait()` waits for it and drops its outcome (the caller no longer wants
    it, and must not use what `make()` uses before it has finished)."""

    def __init__(self, make: Callable[[], T]):
        self._value: Optional[T] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(make,), name="batchrun-ahead", daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], T]) -> None:
        try:
            self._value = make()
        except BaseException as exc:  # noqa: BLE001 - raised to the caller by result()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Behind:
    """`consume(item)` for each item `put`, in a daemon thread, in order, at most `depth` items behind the
    caller (the plan renders a block of rows while the last one is stored: SQLite steps without the GIL).

    The thread's first exception stops it (the items after it are dropped) and is raised to the caller at
    its next `put`, or at `close`, which waits for every item to be consumed: the caller sees what it would
    have seen calling `consume` itself, later. Used as a context manager: leaving it with an exception
    (the caller's own: a bad row, Ctrl-C) drops what is queued and waits for the item in hand, so that
    nothing is consumed once the caller has moved on (the plan then rolls back what was stored)."""

    def __init__(self, consume: Callable[[T], None], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(consume,), name="batchrun-behind", daemon=True)
        self._thread.start()

    def _run(self, consume: Callable[[T], None]) -> None:
        while True:
            item = self._queue.get()
            if item is _END or self._stop:
                return
            if self._error is None:
                try:
                    consume(item)
                except BaseException as exc:  # noqa: BLE001 - raised to the caller at its next put or close
                    self._error = exc

    def put(self, item: T) -> None:
        if self._error is not None:
            self.close()
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every item put to be consumed; raise the thread's exception, if it had one."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "Behind":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            try:
                self.close()
            except BaseException:
                self._halt()   # (interrupted while waiting: the thread must be done before the caller goes on)
                raise
            return
        self._halt()

    def _halt(self) -> None:
        """Drop what is queued and wait for the item in hand; a Ctrl-C meanwhile is raised once it is done
        (the caller must not roll back under a statement still running)."""
        self._stop = True
        interrupted: Optional[BaseException] = None
        while self._thread.is_alive():
            try:
                try:
                    self._queue.put_nowait(_END)   # (a thread waiting for an item: it stops at any)
                except queue.Full:
                    pass
                self._thread.join(0.1)
            except BaseException as exc:  # noqa: BLE001 - raised below, once the thread has stopped
                interrupted = exc
        if interrupted is not None:
            raise interrupted
