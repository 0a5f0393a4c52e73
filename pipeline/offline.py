"""Moved to :mod:`core.offline`; importing this still sets the offline environment (the project imports core.offline)."""
from core.offline import ensure_offline  # noqa: F401 - re-exported (its former home); the import runs it
