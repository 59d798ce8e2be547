"""API keys for `llmkit serve`: one key, or a file of keys each with optional requests/minute and tokens/minute limits.

Key file format: one key per line, then optional `rpm=N` (requests per minute), `tpm=N` (prompt + generated tokens
per minute) and `name=LABEL`; blank lines and lines starting with # are skipped:

    sk-team-a  rpm=60 tpm=20000 name=team-a
    sk-admin
Limits are sliding 60-second windows. A request over a limit gets 429 with Retry-After (seconds until the window has
room). A request holds its prompt plus all it may generate (max_tokens x n) against tpm when it is admitted (429 if
that does not fit in the minute's window) and settles to what it used when it ends.
"""
from __future__ import annotations

import collections
import hmac
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

WINDOW = 60.0


@dataclass
class Key:
    """One API key and its limits (None: unlimited)."""
    secret: str
    name: str
    rpm: int | None = None
    tpm: int | None = None
    requests: collections.deque = field(default_factory=collections.deque)  # times
    tokens: collections.deque = field(default_factory=collections.deque)  # (time, count)


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def read_key_file(path) -> list[Key]:
    """Keys from a key file (see the module docstring); ValueError naming the line on a mistake."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"API key file {path} does not exist")
    keys, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        k = Key(parts[0], name=f"key{len(keys) + 1}")
        for opt in parts[1:]:
            name, _, value = opt.partition("=")
            if name in ("rpm", "tpm"):
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"{path}:{n}: {name} must be a positive integer, got {value!r}")
                setattr(k, name, int(value))
            elif name == "name" and value:
                k.name = value
            else:
                raise ValueError(f"{path}:{n}: unknown option {opt!r} (expected rpm=N, tpm=N or name=LABEL)")
        if k.secret in seen:
            raise ValueError(f"{path}:{n}: the same key appears twice")
        seen.add(k.secret)
        keys.append(k)
    if not keys:
        raise ValueError(f"API key file {path} holds no keys")
    return keys


class KeyRing:
    """Checks keys in constant time and enforces each key's limits."""

    def __init__(self, keys: list[Key]):
        self.keys = keys
        self.lock = threading.Lock()

    def find(self, token: str) -> Key | None:
        """The key matching token (every key is compared, so timing tells nothing), or None."""
        found = None
        for k in self.keys:
            if hmac.compare_digest(token.encode(), k.secret.encode()):
                found = k
        return found

    def admit(self, key: Key, now: float | None = None) -> None:
        """Count one request against key's limits; RateLimited if a limit is reached."""
        now = time.monotonic() if now is None else now
        with self.lock:
            _expire(key, now)
            if key.rpm is not None and len(key.requests) >= key.rpm:
                wait = key.requests[0] + WINDOW - now
                raise RateLimited(f"rate limit of {key.rpm} requests/minute reached for key {key.name!r}",
                                  max(1, math.ceil(wait)))
            if key.tpm is not None and sum(c for _, c in key.tokens) >= key.tpm:
                wait = key.tokens[0][0] + WINDOW - now
                raise RateLimited(f"rate limit of {key.tpm} tokens/minute reached for key {key.name!r}",
                                  max(1, math.ceil(wait)))
            key.requests.append(now)

    def reserve(self, key: Key | None, tokens: int, now: float | None = None) -> list | None:
        """Hold `tokens` (the prompt plus all the request may generate) against key's tokens/minute at admission;
        RateLimited if they do not fit in the window. settle() replaces the hold by what the request used."""
        if key is None or key.tpm is None:
            return None
        now = time.monotonic() if now is None else now
        with self.lock:
            _expire(key, now)
            used = sum(c for _, c in key.tokens)
            if tokens > key.tpm:
                raise RateLimited(f"this request may use {tokens} tokens (prompt + max_tokens x n), more than the "
                                  f"{key.tpm} tokens/minute of key {key.name!r}; ask for fewer max_tokens", WINDOW)
            if used + tokens > key.tpm:
                wait = key.tokens[0][0] + WINDOW - now if key.tokens else 1
                raise RateLimited(f"rate limit of {key.tpm} tokens/minute reached for key {key.name!r} ({used} used "
                                  f"or held, this request may use {tokens})", max(1, math.ceil(wait)))
            hold = [now, tokens]
            key.tokens.append(hold)
            return hold

    def spend(self, key: Key | None, tokens: int, now: float | None = None) -> None:
        """Record tokens a request used that held nothing at admission (embeddings: known when they are counted)."""
        if key is None or key.tpm is None or tokens <= 0:
            return
        with self.lock:
            key.tokens.append([time.monotonic() if now is None else now, tokens])

    def settle(self, hold: list | None, tokens: int) -> None:
        """What a request held at admission becomes what it used (prompt + generated tokens)."""
        if hold is not None:
            with self.lock:
                hold[1] = max(0, tokens)


def _expire(key: Key, now: float):
    while key.requests and key.requests[0] <= now - WINDOW:
        key.requests.popleft()
    while key.tokens and key.tokens[0][0] <= now - WINDOW:
        key.tokens.popleft()
