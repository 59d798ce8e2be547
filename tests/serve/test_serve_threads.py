"""`llmkit serve` loads its models in a thread that ends before it serves (one OpenMP team decodes: see cli/serve.py),
and the KV pool's default bound comes from the model and the rows it serves, said at start-up."""
import threading

import torch

import llmkit.cli.serve as cli_serve
from llmkit.cli import build_parser
from llmkit.infer.kvpool import BlockPool, default_kv_cache_mb, kv_token_bytes
from llmkit.model.config import preset


def test_serve_loads_models_off_the_main_thread(monkeypatch, tmp_path):
    seen = {}

    class LM:
        config = preset("llama-tiny")
        tokenizer = object()
        path = "tiny"

    def fake_load(spec, dtype=None, device="cpu"):
        seen["thread"] = threading.current_thread()
        return LM()

    monkeypatch.setattr("llmkit.model.checkpoint.load_model", fake_load)
    monkeypatch.setattr("llmkit.serve.app.serve", lambda cfg, sock=None: seen.setdefault("served", cfg))
    monkeypatch.setattr(cli_serve.checks, "generative", lambda lm, what: None)
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--port", "0"])
    cli_serve.cmd_serve(args)
    assert seen["thread"] is not threading.main_thread() and not seen["thread"].is_alive()
    assert all(isinstance(m, LM) for m in seen["served"].models.values())


def test_default_kv_pool_fits_the_rows_and_one_context():
    cfg = preset("llama-tiny", max_position_embeddings=4096)
    token_mb = kv_token_bytes(cfg) / 2**20
    assert kv_token_bytes(cfg) == 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 4
    assert default_kv_cache_mb(cfg, 16) == round(16 * 1024 * token_mb, 1)  # rows x 1,024 tokens
    assert default_kv_cache_mb(cfg, 1) == round(4096 * token_mb, 1)  # never less than one whole context
    pool = BlockPool(cfg, None, 16, torch.float32, rows=16)
    assert pool.n_blocks * 16 == 16 * 1024
    line = pool.describe()
    assert "16 rows x 1,024 tokens" in line and "--kv-cache-mb" in line
