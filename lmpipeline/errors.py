"""The one exception type a stage turns into a one-line message instead of a traceback."""

from __future__ import annotations


class StageError(Exception):
    """A user's mistake or a missing input (a bad file, param or model name): the stage prints
    `report()` and exits 1, and the message says what to change."""

    def report(self, stage: str) -> str:
        """What the stage prints: its name, then the message."""
        return f"{stage}: {self}"


class SetupError(StageError):
    """The configuration cannot run here (a missing model or device, a refused precision)."""
