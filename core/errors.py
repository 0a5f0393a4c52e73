"""Errors the CLI turns into one clear line and exit code 2 (bad value, and what to do about it)."""
from __future__ import annotations


class UsageError(Exception):
    """A bad option, path or config value. The message names the value and the fix."""


class IncompleteInput(UsageError):
    """A replayed input (file, folder) that ended early or held unreadable parts.

    A source raises it once it has yielded every frame it could read, so those frames still go through the graph
    (nothing is cut short); the runner then reports it and the command exits 2 instead of 0, because a replay
    that silently lost frames looks exactly like a complete one."""
