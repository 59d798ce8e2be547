"""Shared helpers with no llmkit dependency: atomic writes, JSON/JSONL/CSV/text readers and writers, plots.

This file also holds the two helpers that keep the old flat import paths (before the wings) working for one release:
`warn_moved`, and `old_name`, which the packages that replaced an old module of the same name (`llmkit.model`,
`llmkit.data`, `llmkit.train`) use as their module `__getattr__`. `llmkit/__init__.py` aliases the other old modules.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings

# the frames a deprecation warning looks past to reach the code that used the old path: the import system and the
# modules that forward old names (the root and the packages with an `old_name` __getattr__)
_FORWARDERS = frozenset({"llmkit", "llmkit.utils", "llmkit.model", "llmkit.data", "llmkit.train"})


def warn_moved(old: str, new: str) -> None:
    """A DeprecationWarning that `old` is now `new`, pointed at the first frame outside the import system and the
    forwarding modules (so Python's default filters show it when a script uses an old path)."""
    frame, outer = sys._getframe(1), []
    while frame is not None:  # the frames `warnings` counts: it skips the import system's _bootstrap frames
        code = frame.f_code.co_filename
        if not ("importlib" in code and "_bootstrap" in code):
            outer.append(frame.f_globals.get("__name__", ""))
        frame = frame.f_back
    skip = [n in _FORWARDERS or n == "importlib" or n.startswith("importlib.") for n in outer]
    level = 2 + (skip.index(False) if False in skip else len(skip))
    warnings.warn(f"{old} is deprecated: it moved to {new} (the old path goes in the next release)",
                  DeprecationWarning, stacklevel=level)


def old_name(package: str, name: str, home: str, namespace: dict):
    """Module `__getattr__` of a package that replaced an old flat module of the same name: `name`, if it is no
    submodule of the package and the old module's new home (`package.home`) defines it, with a DeprecationWarning,
    kept in `namespace` (the package's globals) so that the warning comes once."""
    missing = AttributeError(f"module {package!r} has no attribute {name!r}")
    if name.startswith("__"):
        raise missing
    pkg = sys.modules[package]
    if importlib.machinery.PathFinder.find_spec(f"{package}.{name}", list(pkg.__path__)) is not None:
        raise missing  # a submodule: the import system imports it
    try:
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
    except AttributeError:
        raise missing from None
    warn_moved(f"{package}.{name}", f"{package}.{home}.{name}")
    namespace[name] = value
    return value
