"""Interrupts that lose nothing: SIGINT (Ctrl-C) and SIGTERM (a scheduler's kill, ``timeout``) become an
:class:`Interrupted` exception raised in the main thread, except inside a :func:`critical` section (writing
a batch's files and manifest lines, logging them), where it waits until the section ends. The run then
closes its W&B run and exits with 130 / 143 like a shell does."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # BaseException, like KeyboardInterrupt: `except Exception` must not eat it
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.exit_code = signum, 128 + signum


_state = threading.local()


def _handler(signum: int, frame: object) -> None:
    if getattr(_state, "depth", 0):
        _state.pending = signum
    else:
        raise Interrupted(signum)


@contextmanager
def installed() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`Interrupted` for the duration (main thread only; elsewhere, e.g. a
    launcher's worker thread, the signals keep their handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def critical() -> Iterator[None]:
    """A section an interrupt must not split (files + manifest lines of one batch); it is raised after."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        pending = getattr(_state, "pending", None)
        if not _state.depth and pending is not None:
            _state.pending = None
            raise Interrupted(pending)
