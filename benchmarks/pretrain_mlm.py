"""A small BERT-style masked LM on WikiText-2; writes benchmarks/results/pretrain_mlm.json.

Trains a 4k byte-level BPE vocabulary and a bert-tiny-shaped encoder on wikitext-2/valid.txt (the shared data holds
the validation and test splits), then reports masked-token accuracy on test.txt (BERT masking, fixed masks) against
the unigram baseline: always predicting the training data's most frequent token.

    python benchmarks/pretrain_mlm.py [--data-dir ../shared/data/wikitext-2] [--max-steps 600]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.data.corpus import IGNORE, BlockLoader, tokenize_files  # noqa: E402
from llmkit.utils.io import write_results  # noqa: E402
from llmkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from llmkit.model.tokenizer import Tokenizer  # noqa: E402
from llmkit.train.loop import TrainConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data" / "wikitext-2"))
    ap.add_argument("--out", default=None, help="run folder (default: a temporary folder)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "pretrain_mlm.json"))
    args = ap.parse_args()
    train_file, test_file = Path(args.data_dir) / "valid.txt", Path(args.data_dir) / "test.txt"
    for f in (train_file, test_file):
        if not f.is_file():
            raise SystemExit(f"{f} not found: pass --data-dir path/to/wikitext-2")
    out = args.out or tempfile.mkdtemp(prefix="llmkit-mlm-")
    block, batch = 128, 16

    tc = TrainConfig(max_steps=args.max_steps, lr=1e-3, min_lr=1e-4, warmup_steps=50, beta2=0.98, weight_decay=0.01,
                     eval_every=0, eval_steps=100000, log_every=50, seed=0, progress=sys.stderr.isatty())
    pc = PretrainConfig(data=[str(train_file)], val_data=[str(test_file)], out=out, objective="mlm",
                        model_config="bert-tiny", vocab_size=args.vocab_size, block_size=block, batch_size=batch,
                        n_layer=4, n_head=4, n_embd=128, dropout=0.0, train=tc)
    t0 = time.time()
    res = pretrain(pc)
    wall = time.time() - t0

    # unigram baseline on exactly the masked positions the evaluation scored
    tok = Tokenizer.from_dir(out)
    cache = Path(out) / "cache"
    train_ids = tokenize_files([train_file], tok, cache, progress=False)
    test_ids = tokenize_files([test_file], tok, cache, progress=False)
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=tok.vocab_size)
    counts[tok.all_special_ids] = 0
    top = int(counts.argmax())
    loader = BlockLoader(test_ids, block, batch, objective="mlm", seed=tc.seed, shuffle=False, mask_id=tok.mask_id,
                         vocab_size=tok.vocab_size, special_ids=tok.all_special_ids)
    hit = n = 0
    for b in loader:
        scored = b["labels"][b["labels"] != IGNORE]
        hit += int((scored == top).sum())
        n += scored.numel()
    result = {
        "name": "pretrain_mlm",
        "masked_accuracy": round(res["val_accuracy"], 4),
        "unigram_baseline_accuracy": round(hit / n, 4),
        "unigram_token": tok.id_to_token(top),
        "masked_tokens_scored": n,
        "val_loss": round(res["val_loss"], 4),
        "val_ppl": round(res["val_ppl"], 2),
        "vocab_size": tok.vocab_size,
        "train_file": "wikitext-2/valid.txt",
        "test_file": "wikitext-2/test.txt",
        "steps": res["step"],
        "tokens": res["tokens"],
        "train_seconds": round(json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])["time"], 1),
        "wall_seconds": round(wall, 1),
        "model": "bert-tiny layout, 4 layers, 4 heads, 128 wide",
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "python benchmarks/pretrain_mlm.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    write_results(args.result, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
