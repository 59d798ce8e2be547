"""Fine-tuning: assistant-only loss masks, classification / chat / text runs through the CLI, resume, bad input."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.model.checkpoint import load_model, save_model
from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.data.corpus import IGNORE
from llmkit.data.sft import alpaca_to_messages, assistant_mask, encode_chat
from llmkit.model.transformer import Transformer
from llmkit.model.tokenizer import Tokenizer

DATA = Path(__file__).parents[1] / "data"
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE tokenizer (SmolLM-style specials and ChatML template), trained in-process."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = (DATA / "sst_train_30.tsv").read_text() + (DATA / "seed_tasks_chat_6.jsonl").read_text()
    hf.train_from_iterator(corpus.splitlines(), trainer)
    return Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     unk_token="<|endoftext|>", chat_template=CHATML, add_bos_token=False)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """A tiny Llama model folder with that tokenizer."""
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    out = tmp_path_factory.mktemp("base")
    save_model(out, model, tok)
    return out


CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a color."},
         {"role": "assistant", "content": "Blue."}]


def test_loss_mask_is_exactly_the_assistant_turns(tok):
    ids, keep = assistant_mask(tok, CONVO)
    assert ids == tok.encode(tok.apply_chat_template(CONVO), add_special_tokens=False)
    kept = tok.decode([i for i, k in zip(ids, keep) if k])
    masked = tok.decode([i for i, k in zip(ids, keep) if not k])
    assert kept == "Hello! How can I help?<|im_end|>Blue.<|im_end|>"  # not the newline after each
    assert masked == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                      "<|im_start|>assistant\n\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n\n")
    # labels are aligned for next-token loss: position t scores token t + 1 only when that one is the assistant's
    ids2, labels, cut = encode_chat(tok, CONVO, 512)
    assert ids2 == ids and not cut
    assert labels == [ids[t + 1] if keep[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    # truncation is reported, not silent
    assert encode_chat(tok, CONVO, 10)[2] is True


def test_instruct_records_render_as_user_and_assistant(tok):
    msgs = alpaca_to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"})
    assert msgs == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    ids, keep = assistant_mask(tok, msgs)
    assert tok.decode([i for i, k in zip(ids, keep) if k]) == "5<|im_end|>"


def test_classify_lora_run_adapter_and_classify_command(base, tmp_path, capsys):
    out = tmp_path / "cls"
    rc = main(["finetune", "--model", str(base), "--data", str(DATA / "sst_train_30.tsv"), "--task", "classify",
               "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--val-fraction", "0.2",
               "--lora-targets", "all", "--no-progress"])
    assert rc == 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "val_metrics.json",
              "confusion_matrix.png", "tokenizer.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "val_metrics.json").read_text())
    assert set(m) >= {"acc", "macro_f1", "per_class", "confusion_matrix"} and m["labels"] == ["0", "1"]
    assert "accuracy" in capsys.readouterr().err  # the report is printed
    # --model ADAPTER_DIR works for classify, plain and JSON
    assert main(["classify", "--model", str(out), "a gorgeous film", "dull and lifeless"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("0", "1") for line in lines)
    assert 0.5 <= float(lines[0].split("\t")[1]) <= 1.0
    assert main(["classify", "--model", str(out), "--json", "fine"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in ("0", "1") and abs(sum(row["probs"].values()) - 1) < 1e-4


def test_full_classifier_loads_in_transformers_with_same_logits(base, tmp_path):
    out = tmp_path / "full"
    rc = main(["finetune", "--model", str(base), "--data", str(DATA / "sst_train_30.tsv"), "--task", "classify",
               "--method", "full", "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["id2label"] == {"0": "0", "1": "1"} and cfg["label2id"] == {"0": 0, "1": 1}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = load_model(out).model
    ids = torch.randint(3, 320, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 2  # right padding with the pad token, as transformers finds the last real token
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (ours(ids, attention_mask=mask, head="classify") - ref).abs().max() <= 1e-4


def test_chat_lora_run_resumes(base, tmp_path):
    out = tmp_path / "chat"
    args = ["finetune", "--model", str(base), "--data", str(DATA / "seed_tasks_chat_6.jsonl"), "--out", str(out),
            "--batch-size", "2", "--val-fraction", "0.34", "--save-every", "1", "--max-length", "256", "--no-progress"]
    assert main(args + ["--max-steps", "2"]) == 0
    run = json.loads((out / "run_config.json").read_text())
    assert run["finetune"]["task"] == "chat" and run["finetune"]["n_train"] == 4
    assert main(args + ["--max-steps", "3", "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and sorted(steps) == steps
    lm = load_model(out)  # base + merged adapter
    assert lm.tokenizer is not None and lm.config.num_labels == 0


def test_text_task_lora_on_top_layers(base, tmp_path):
    out = tmp_path / "text"
    assert main(["finetune", "--model", str(base), "--data", str(DATA / "tinyshakespeare_head.txt"), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--lora-layers", "1",
                 "--no-progress"]) == 0
    run = json.loads((out / "run_config.json").read_text())
    assert run["finetune"]["task"] == "text"
    ac = json.loads((out / "adapter_config.json").read_text())
    assert ac["layers_to_transform"] == [1] and ac["task_type"] == "CAUSAL_LM"


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name,text,flags,msg", [
    ("empty.jsonl", "", [], "is empty"),
    ("cols.csv", "review_text,stars\nnice,5\nbad,1\n", ["--task", "classify"], "cannot find a text column"),
    ("cols2.csv", "text,label\nnice,pos\nbad,neg\n", ["--label-column", "y"], "no label column 'y'"),
    ("one.tsv", "sentence\tlabel\nnice\tpos\nfine\tpos\nok\tpos\n", [], "one class"),
    ("noasst.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n' * 3, [], "no assistant turn"),
    ("targets.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t0\nd\t1\n", ["--lora-targets", "qq"], "unknown LoRA target"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base, tmp_path, capsys, name, text, flags, msg):
    data = _bad(tmp_path, name, text)
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "1",
               "--batch-size", "1", "--val-fraction", "0.34", "--no-progress"] + flags)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.strip().count("\n") == 0, err
    assert not out.exists()
