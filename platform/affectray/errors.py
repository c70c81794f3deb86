"""The one base of every error that means bad input rather than a bug.

Every area derives its errors from :class:`AffectrayError` (a config key that does not
exist, a file that is not a video, a checkpoint that does not fit), and the job runner
catches the base: such an error is one line naming the file or key, exit status 2.
Anything else is a bug and keeps its traceback. This module imports nothing, so the
lowest floor can use it.
"""

from __future__ import annotations


class AffectrayError(Exception):
    """Bad input, a missing file, a setting that cannot work: reported in one line, no traceback."""


class JobError(AffectrayError):
    """A job that cannot run as asked (nothing to read, contradictory settings)."""
