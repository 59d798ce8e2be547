"""Compression recipes (prune, distill) and the before/after report."""
