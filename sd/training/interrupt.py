"""Stopping a training run without losing it: Ctrl-C (SIGINT) and SIGTERM ask the loop to stop between two steps.

While the loop runs, either signal only sets a flag; the loop finishes the step it is in, saves a checkpoint of
that step and raises `TrainingInterrupted`, so `--resume` continues from there. A second Ctrl-C quits at once.
Raising from the signal handler instead could land inside `optimizer.step()` and save half-updated weights.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# The signals a user or a job scheduler (Slurm, Kubernetes, torchrun) sends to stop a process.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving its checkpoint; `signum` says which (exit code 128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """Context manager: inside it SIGINT and SIGTERM set `self.signum` instead of stopping the process.

    Signal handlers can only be set from the main thread; elsewhere (a worker thread) the signals keep their
    usual effect.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _request(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt              # the second Ctrl-C: quit now, without the checkpoint
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


@contextmanager
def sigterm_raises():
    """Inside it SIGTERM raises TrainingInterrupted, as Ctrl-C raises KeyboardInterrupt: outside a loop's steps
    (drawing the data, encoding it, between stages) there is nothing new to save, only a clean one-line exit."""
    def interrupt(signum, frame):
        raise TrainingInterrupted("SIGTERM outside the training steps (the finished stages are saved)", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
