"""Files: atomic writes with the mode open() would give them (the one home of atomic writes), and strict readers
(UTF-8 text whose errors name the line, JSON/JSONL records) shared by every wing."""
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


def write_results(path, results: dict) -> None:
    """Write results as pretty JSON, atomically, creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)


# ---------------------------------------------------------------------------------------------------------------
# strict readers: one clear line per problem, naming the file and the line (or record)


def check_file(path, what: str = "data file") -> Path:
    """`path` as a Path if it is a readable file; else one clear error (missing, or a folder where a file belongs)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return p


def read_utf8(path, records: bool = False) -> str:
    """The whole UTF-8 text of a file; errors name the line (or record) with bad bytes, or say the file is empty."""
    raw = check_file(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[:e.start].split(b"\n")
        where = f"line {len(before)}"
        if records:  # records are the non-blank lines
            where = f"record {sum(1 for b in before[:-1] if b.strip()) + 1} ({where})"
        raise ValueError(f"{path}: {where}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "convert the file to UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; give a text file with some content")
    return text


def read_json_records(path) -> list[dict]:
    """Records of a .jsonl file (one JSON object a line) or a .json file holding a list of objects."""
    text = read_utf8(path, records=not str(path).endswith(".json"))
    if str(path).endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        records = data
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: record {len(records) + 1} (line {n}): not valid JSON ({e.msg})") from None
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i}: expected a JSON object, got {type(r).__name__}")
    if not records:
        raise ValueError(f"{path}: no records found")
    return records
