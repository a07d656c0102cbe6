"""Exceptions that the CLI turns into one-line messages and exit codes.

Exit codes: 0 success; 1 a result fell short of a threshold the user set
(``bench --fail-under``) or a training run diverged or collapsed; 2 bad input or usage.
"""

from __future__ import annotations


class RcompError(Exception):
    """Bad input or usage: reported as one line, exit code 2.

    The message names the problem and, where possible, the fix.
    """

    exit_code = 2


class ThresholdError(RcompError):
    """A measured result fell below a threshold the user set: exit code 1.

    From the Python API, ``.result`` holds the stage's :class:`rcomp.Result` (the report that fell short, and
    the file ``output=`` wrote) where the stage measured before refusing (bench ``fail_under``); else None."""

    exit_code = 1
    result = None


class TrainingFailed(RcompError):
    """A training run went bad (non-finite loss or weights, collapse to chance): exit code 1.

    Raised before anything is written, so no model comes out of a failed run.
    """

    exit_code = 1


class AlreadyReported(RcompError):
    """A failure another process of the same run has already said (a recipe's torchrun or --workers
    processes): the command exits with ``exit_code`` without printing a second line."""

    def __init__(self, message: str = "", exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
