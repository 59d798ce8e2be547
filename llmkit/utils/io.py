"""Files that appear whole or not at all, with the mode open() would give them: the one home of atomic writes."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask, read without changing it (os.umask can only set it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def shared_mode(path, folder: bool = False) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the mode open()/mkdir() would have."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temp file in the same folder, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        shared_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    """Write JSON atomically."""
    write_atomic(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
