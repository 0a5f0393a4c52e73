"""Make Ultralytics safe on a machine without internet: no weight, font or dataset downloads, no pip installs.

Import this module (or call :func:`ensure_offline`) before importing ``ultralytics`` anywhere in the project.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

# CompressAI scripts a helper with torch.jit at import; torch 2.14 warns about it on every start. Not ours to fix.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

_DONE = False


def ensure_offline(config_dir: str | os.PathLike | None = None) -> None:
    """Set the environment so Ultralytics never reaches for the network and keeps its settings in the checkout."""
    global _DONE
    if _DONE:
        return
    os.environ.setdefault("YOLO_OFFLINE", "1")  # is_online() -> False: no hub, no asset downloads
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")  # never pip-install missing requirements at run time
    if config_dir is None:
        config_dir = Path(__file__).resolve().parent.parent / ".venv" / "ultralytics-config"
    Path(config_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    _DONE = True


ensure_offline()
