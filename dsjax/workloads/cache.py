"""On-disk cache of prepared workloads: JSON files written atomically, without locks.

Layout: `$DSJAX_CACHE/workloads/<key>.json`, or `~/.cache/dsjax/workloads/<key>.json` when
`DSJAX_CACHE` is unset. A writer writes a private temp file in the same folder and `os.replace`s
it into place, so a reader sees either no file or a whole one; two processes preparing the same
workload at once both write identical content and the last rename wins. A file that does not parse
or whose fingerprint differs (new package version, new preparation rules) counts as a miss.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "DSJAX_CACHE"


def cache_dir() -> Path:
    """Root of dsjax's cache; the folder need not exist yet."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "dsjax"


def workload_cache_path(key: str) -> Path:
    if not key or os.sep in key or key.startswith("."):
        raise ValueError(f"{key=} must be a plain file stem")
    return cache_dir() / "workloads" / f"{key}.json"


def read_cached(path: Path, fingerprint: dict[str, Any]) -> Any | None:
    """The cached payload, or None when the file is missing, corrupt or from another fingerprint."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
        return None
    return doc.get("payload")


def write_cached(path: Path, fingerprint: dict[str, Any], payload: Any) -> None:
    """Writes `{"fingerprint", "payload"}` to `path` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fingerprint, "payload": payload}, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
