"""Graceful Ctrl-C: the first SIGINT (or SIGTERM) asks the loop to stop at the next safe point.

The loop polls the flag after each optimiser step (single process) or at each log point
(``torchrun``: the ranks agree through the loss all-reduce), writes a resumable checkpoint there and
raises :class:`TrainingInterrupted`. A second Ctrl-C interrupts at once. A ``KeyboardInterrupt``
raised anywhere in the step (e.g. by the task) is handled in a single process by rolling back to
the last finished optimiser step and saving that.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType, SimpleNamespace
from typing import Iterator

from ..errors import TrainingError


class TrainingInterrupted(TrainingError):
    """Training stopped on request after writing a resumable checkpoint."""


@contextlib.contextmanager
def stop_requests() -> Iterator[SimpleNamespace]:
    """Install SIGINT/SIGTERM handlers (main thread only) that set the yielded flag's ``requested``."""
    flag = SimpleNamespace(requested=False)

    def handle(signum: int, frame: FrameType | None) -> None:
        if flag.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag.requested = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
