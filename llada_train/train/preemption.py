"""Pre-emption: SIGTERM/SIGUSR1 (SLURM's warning signals) ask for a checkpoint, then exit."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Remembers that a pre-emption signal arrived; the trainer polls it once per step.

    Install it at the entry point before any slow start-up work, so a signal sent while the
    model is still being built is remembered instead of killing the job without a checkpoint.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls, signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> PreemptionFlag:
        """A flag whose handlers are installed for ``signals`` (main thread only)."""
        flag = cls()
        for sig in signals:
            flag._previous[sig] = signal.signal(sig, flag._record)
        return flag

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        # a handler only appends: anything heavier could run in the middle of a collective
        self.received.append(signum)

    @property
    def requested(self) -> bool:
        """True once any pre-emption signal has arrived."""
        return bool(self.received)

    def uninstall(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
