"""Shared helpers with no llmkit dependency: atomic writes, JSON/JSONL/CSV/text readers and writers, plots."""
