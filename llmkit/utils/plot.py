"""Plots written like every other file: whole or not at all, with the mode open() would give them."""
from __future__ import annotations

import os
import tempfile

from llmkit.utils.io import shared_mode


def save_figure(fig, path) -> None:
    """Save a matplotlib figure as a PNG (dpi 120, tight) through a temp file in the same folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        shared_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
