"""Graceful Ctrl-C: the first SIGINT (or SIGTERM) asks the loop to stop at the next safe point.

The training loop polls the flag after each optimiser step (single process) or at each log
point (``torchrun``: the ranks agree through the loss all-reduce), writes a resumable
checkpoint there and raises :class:`TrainingInterrupted`. A second Ctrl-C interrupts at once.
A ``KeyboardInterrupt`` raised anywhere else in the step (e.g. by the task) is handled in a
single process by rolling back to the last finished optimiser step and saving that.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from ..errors import TrainingError


class TrainingInterrupted(TrainingError):
    """Training stopped on request after writing a resumable checkpoint."""


class StopFlag:
    """Context manager installing SIGINT/SIGTERM handlers that set :attr:`requested`."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
