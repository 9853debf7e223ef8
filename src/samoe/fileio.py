"""Atomic file writes (write to a temporary name in the same directory, then rename), and where
samoe keeps what it caches."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$SAMOE_CACHE, else $XDG_CACHE_HOME/samoe, else ~/.cache/samoe: the prepared built-in corpora
    and the compiled expert kernel."""
    if os.environ.get("SAMOE_CACHE"):
        return Path(os.environ["SAMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "samoe"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to path so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cache(path: Path) -> dict:
    """A cache file's JSON object; {} when it is missing, unreadable or not a JSON object (the
    caller then computes the value again)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}
