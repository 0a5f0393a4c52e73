"""Moved to :mod:`core.errors`; this name stays for third-party code (the project imports core.errors)."""
from core.errors import IncompleteInput, UsageError  # noqa: F401 - re-exported (their former home)
