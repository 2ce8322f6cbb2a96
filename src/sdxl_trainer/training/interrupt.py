"""SIGINT/SIGTERM during training: finish the step, save a checkpoint, exit; a second signal exits at once.

An interrupted run exits with 128 + the signal number (130 for Ctrl+C, 143 for SIGTERM), the
shell convention, so that `train ... && export ...` chains stop; the checkpoint it saved resumes
with `train.resume=latest`. The second signal raises KeyboardInterrupt wherever the process is;
a save in progress then leaves only a temporary folder behind (saves are atomic).
"""

from __future__ import annotations

import signal
import threading

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised by the loop after the checkpoint of an interrupted run is saved."""

    def __init__(self, step: int, signum: int):
        self.step = step
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         "a checkpoint was saved: resume with train.resume=latest")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: records the first SIGINT/SIGTERM (`signum`), raises KeyboardInterrupt on the second."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: exiting at once")
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
