"""Chat loss masks on token edges: the trained tokens are each assistant reply plus its end-of-turn token, exactly.

Checked on the default model's tokenizer (SmolLM2, ChatML, whose byte-level BPE merges runs of newlines) and on tiny
byte-level BPEs, for replies that start or end with a newline, hold only whitespace, are empty, and for multi-turn
chats with and without a system prompt. Nothing the template writes after the end-of-turn token (ChatML's "\n") is
trained; a token that straddles the assistant header and the reply ("\n" + the reply's leading "\n" merged into one
"\n\n") is trained, because it holds reply text.
"""
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.data.corpus import IGNORE
from llmkit.data.sft import assistant_mask, encode_chat
from llmkit.model.checkpoint import load_model
from llmkit.model.tokenizer import Tokenizer
from helpers import CHATML, make_tiny_model

END = "<|im_end|>"


def user(text):
    return {"role": "user", "content": text}


def reply(text):
    return {"role": "assistant", "content": text}


# (messages, the header text each trained run starts with on SmolLM2's tokenizer: "" where the reply's first token
# starts the reply, "\n" where BPE merged the header's newline into the reply's first token)
CASES = {
    "plain": ([user("Hi"), reply("Hello")], [""]),
    "leading newline": ([user("Hi"), reply("\nHello")], [""]),
    "two leading newlines": ([user("Hi"), reply("\n\nHello")], ["\n"]),
    "trailing newline": ([user("Hi"), reply("Hello\n")], [""]),
    "only a newline": ([user("Hi"), reply("\n")], ["\n"]),
    "only spaces": ([user("Hi"), reply("  ")], ["\n"]),
    "only newlines": ([user("Hi"), reply("\n\n")], ["\n"]),
    "tab and newline first": ([user("Hi"), reply("\t\n x")], ["\n"]),
    "spaces around": ([user("Hi"), reply(" Hi ")], [""]),
    "empty": ([user("Hi"), reply("")], [""]),
    "multi-turn with system": ([{"role": "system", "content": "Be brief."}, user("Hi there"), reply("\n\nHello!\n"),
                                user("Name a color."), reply("Blue.\n\n")], ["\n", ""]),
    "multi-turn, default system": ([user("a"), reply("\nx\n"), user("b"), reply("  y"), user("c"), reply("z")],
                                   ["", "\n", ""]),
}


def trained_runs(tok, messages):
    """The decoded runs of consecutive trained tokens, and the text of the untrained ones."""
    ids, keep = assistant_mask(tok, messages)
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    runs, cur = [], []
    for i, k in zip(ids, keep):
        if k:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs], tok.decode([i for i, k in zip(ids, keep) if not k])


def expected_runs(messages, heads):
    return [head + m["content"] + END for m, head in zip([m for m in messages if m["role"] == "assistant"], heads)]


def check_labels(tok, messages):
    """Next-token labels follow the mask, and the template's newline after the last end-of-turn is not trained."""
    ids, keep = assistant_mask(tok, messages)
    assert tok.decode(ids[-2:]) == END + "\n" and keep[-2] and not keep[-1]
    ids2, labels, cut = encode_chat(tok, messages, 4096)
    assert ids2 == ids and not cut
    assert labels == [ids[t + 1] if keep[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


@pytest.fixture(scope="module")
def smol():
    return load_model("default", dtype="bfloat16").tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tokenizer.from_dir(make_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny_merging():
    """A tiny byte-level BPE trained on text full of blank lines, so that "\n\n" and "\n " are single tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["Hello\n\nworld\n\n\n  x\n  y\n\n"] * 20, trainer)
    tok = Tokenizer(hf, bos_token="<|im_start|>", eos_token=END, pad_token="<|endoftext|>", chat_template=CHATML)
    assert tok.token_to_id("ĊĊ") is not None and tok.token_to_id("ĊĠ") is not None
    return tok


@pytest.mark.parametrize("name", list(CASES))
def test_default_tokenizer_trains_exactly_the_replies(smol, name):
    messages, heads = CASES[name]
    runs, untrained = trained_runs(smol, messages)
    assert runs == expected_runs(messages, heads)
    # every character of the conversation is in exactly one of the two, so the header and the template's trailing
    # newline are untrained (a straddling token's header part counted once, on the trained side)
    text = smol.apply_chat_template(messages)
    assert len("".join(runs)) + len(untrained) == len(text)
    check_labels(smol, messages)


def test_default_tokenizer_straddle_is_the_merged_header_newline(smol):
    """The straddling token is the header's "\n" merged with the reply's first "\n"; it is trained, and the tokens
    before it (the header) are not."""
    messages = [user("Hi"), reply("\n\nHello")]
    ids, keep = assistant_mask(smol, messages)
    first = keep.index(True)
    assert smol.decode([ids[first]]) == "\n\n" and smol.decode(ids[:first]).endswith("<|im_start|>assistant")
    assert smol.decode([i for i, k in zip(ids, keep) if k]) == "\n\n\nHello" + END


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_tokenizer_trains_exactly_the_replies(tiny, name):
    messages, _ = CASES[name]
    runs, untrained = trained_runs(tiny, messages)
    # this BPE has no merges across newlines, so no token straddles the header: the runs are the contents exactly
    assert runs == expected_runs(messages, [""] * len(runs))
    check_labels(tiny, messages)


def test_tiny_merging_tokenizer_trains_straddling_tokens(tiny_merging):
    # (BPE pre-splits "\n\nHello" as "\n" + "\nHello" and "\n x" as "\n" + " x": no straddle there)
    cases = [([user("Hi"), reply("\nHello")], [""]),
             ([user("Hi"), reply(" x")], [""]),
             ([user("Hi"), reply("  x")], ["\n"]),
             ([user("Hi"), reply("  ")], ["\n"]),
             ([user("Hi"), reply("\n\n")], ["\n"]),
             ([user("Hi"), reply("Hello\n\n")], [""]),
             ([user("a"), reply("\n\nworld\n"), user("b"), reply("y")], ["\n", ""])]
    for messages, heads in cases:
        runs, untrained = trained_runs(tiny_merging, messages)
        assert runs == expected_runs(messages, heads), messages
        check_labels(tiny_merging, messages)


def test_template_that_trims_the_reply(tiny):
    """A template that strips the content (as Llama 3's does): the trimmed reply and its end-of-turn are trained."""
    trimming = Tokenizer(HFTokenizer.from_str(tiny.hf.to_str()), bos_token="<|im_start|>", eos_token=END,
                         pad_token="<|endoftext|>",
                         chat_template=CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}"))
    messages = [user("Hi"), reply("\n Hello \n")]
    runs, _ = trained_runs(trimming, messages)
    assert runs == ["Hello" + END]
