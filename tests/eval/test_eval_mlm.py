"""`llmkit eval mlm`: masked accuracy under the pretraining masking and pseudo-perplexity, checked against direct
computations with transformers on a tiny BertForMaskedLM folder."""
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from llmkit.data.corpus import IGNORE, BlockLoader, tokenize_files
from llmkit.eval.mlm import evaluate_mlm, masked_windows, sentence_windows
from llmkit.model.checkpoint import load_model
from llmkit.train.loop import evaluate
from llmkit.train.losses import mlm_loss

SENTENCES = ["the cat sat on the mat .", "a dog ran in the park and the cat sat still .",
             "the mat was red .", "birds sing in the morning while the dog sleeps on the mat ."]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BertForMaskedLM and a WordPiece tokenizer, both written by save_pretrained."""
    root = tmp_path_factory.mktemp("mlm")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(SENTENCES * 4, trainers.WordPieceTrainer(vocab_size=80, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  type_vocab_size=2, pad_token_id=0)
    model = transformers.BertForMaskedLM(cfg).eval()
    model.save_pretrained(root / "bert")
    fast.save_pretrained(root / "bert")
    data = root / "sentences.txt"
    data.write_text("\n".join(SENTENCES * 3) + "\n")
    return root / "bert", data, model, fast


def test_pll_equals_a_transformers_loop(bert):
    folder, data, hf, fast = bert
    lm = load_model(folder, dtype="float32", device="cpu")
    res = evaluate_mlm(lm, data, context=64, batch_size=3)
    # Salazar et al.: each sentence as [CLS] ... [SEP], each token masked in turn, log p summed
    total, n = 0.0, 0
    for text in SENTENCES * 3:
        ids = fast(text, return_tensors="pt")["input_ids"][0]
        for j in range(1, len(ids) - 1):
            masked = ids.clone()
            masked[j] = fast.mask_token_id
            with torch.no_grad():
                logits = hf(input_ids=masked[None]).logits[0, j]
            total += float(logits.log_softmax(-1)[ids[j]])
            n += 1
    assert res["n_tokens"] == n and res["n_sentence_windows"] == len(SENTENCES) * 3
    assert res["pseudo_loglikelihood"] == pytest.approx(total, abs=1e-4)
    assert res["pseudo_perplexity"] == pytest.approx(math.exp(-total / n), rel=1e-5)
    # the windows are [CLS] ... [SEP] exactly as transformers' tokenizer writes them
    assert sentence_windows(lm.tokenizer, data, 64)[0] == fast(SENTENCES[0])["input_ids"]


def test_masked_accuracy_equals_a_direct_computation(bert):
    folder, data, hf, fast = bert
    lm = load_model(folder, dtype="float32", device="cpu")
    res = evaluate_mlm(lm, data, context=16, seed=3, batch_size=2)
    windows, used = masked_windows(lm.tokenizer, data, 16, seed=3)
    assert used == 16 and res["n_windows"] == len(windows) > 2
    n = top1 = top5 = 0
    loss = 0.0
    for ids, labels in windows:
        with torch.no_grad():
            logits = hf(input_ids=ids[None]).logits[0]
        for j in torch.nonzero(labels != IGNORE)[:, 0].tolist():
            n += 1
            loss -= float(logits[j].log_softmax(-1)[labels[j]])
            top1 += int(logits[j].argmax() == labels[j])
            top5 += int(labels[j] in logits[j].topk(5).indices)
    assert res["masked_tokens"] == n > 0
    assert res["masked_acc"] == pytest.approx(top1 / n, abs=1e-9)
    assert res["masked_top5_acc"] == pytest.approx(top5 / n, abs=1e-9)
    assert res["masked_loss"] == pytest.approx(loss / n, abs=1e-4)
    # pretraining masking: 15 % picked, never a special token, the same masks for any batch size
    special = set(lm.tokenizer.all_special_ids)
    assert all(int(t) not in special for ids, lab in windows for t in lab[lab != IGNORE])
    assert evaluate_mlm(lm, data, context=16, seed=3, batch_size=5)["masked_acc"] == res["masked_acc"]
    limited = evaluate_mlm(lm, data, context=16, seed=3, limit=2)
    assert limited["n_windows"] == 2 and limited["n_sentence_windows"] == 2
    # a sentence longer than --context is cut into windows, each wrapped in [CLS] ... [SEP]
    long = sentence_windows(lm.tokenizer, data, 8)
    assert len(long) > len(SENTENCES) * 3 and all(len(w) <= 8 for w in long)
    assert all(w[0] == fast.cls_token_id and w[-1] == fast.sep_token_id for w in long)


def test_same_figure_as_pretraining_validation(bert):
    """Pretraining's validation (train.loop.evaluate with mlm_loss over the unshuffled BlockLoader) gives the same
    loss and accuracy on the same tokens, context and seed."""
    folder, data, _, _ = bert
    lm = load_model(folder, dtype="float32", device="cpu")
    tok = lm.tokenizer
    res = evaluate_mlm(lm, data, context=16, seed=7, batch_size=4)
    with tempfile.TemporaryDirectory() as d:
        tokens = np.array(tokenize_files([data], tok, d, progress=False))
    loader = BlockLoader(tokens, 16, 1, objective="mlm", seed=7, shuffle=False, mask_id=tok.mask_id,
                         vocab_size=tok.vocab_size, special_ids=tok.all_special_ids)
    val = evaluate(lm.model, loader, mlm_loss, 10**6, None, torch.device("cpu"))
    assert val["val_loss"] == pytest.approx(res["masked_loss"], abs=1e-5)
    assert val["val_accuracy"] == pytest.approx(res["masked_acc"], abs=1e-6)


def llmkit(*args):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_writes_results_and_table(bert, tmp_path):
    folder, data, _, _ = bert
    out = tmp_path / "r.json"
    r = llmkit("eval", "mlm", "--model", str(folder), "--data", str(data), "--context", "16", "--seed", "1",
               "--out", str(out), "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["task"] == "mlm" and res["seed"] == 1 and res["context"] == 16
    for key in ("masked_acc", "masked_top5_acc", "masked_loss", "pseudo_perplexity"):
        assert f"| {key} | {res[key]:.4f} |" in r.stdout


def test_cli_refuses_a_causal_model(bert, tmp_path):
    _, _, _, fast = bert
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    r = llmkit("eval", "mlm", "--model", str(tmp_path / "m"), "--data", str(data), "--device", "cpu")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("[")]
    assert len(lines) == 1 and "causal (decoder)" in lines[0], r.stderr
