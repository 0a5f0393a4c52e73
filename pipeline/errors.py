"""Errors the CLI turns into one clear line and exit code 2 (bad value, and what to do about it)."""
from __future__ import annotations


class UsageError(Exception):
    """A bad option, path or config value. The message names the value and the fix."""
