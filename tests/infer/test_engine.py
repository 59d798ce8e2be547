"""Engine: KV-cache decoding equals plain forwards, batching equals single prompts, sampling, stops, streaming."""
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from llmkit.model.config import preset
from llmkit.infer.engine import Engine, SamplingParams, apply_penalties, filter_logits, sample_next
from llmkit.model.transformer import Transformer
from llmkit.model.tokenizer import StreamDecoder, Tokenizer

SENTENCES = [
    "hello world, hello there. The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "A small model that writes text one token at a time, with a cache of keys and values.",
] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained in-process on a few sentences (emoji stay split into single-byte tokens)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    hf.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf, eos_token="<|endoftext|>", chat_template=CHATML)


def random_model(vocab, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(preset("llama-tiny", vocab_size=vocab))
    with torch.no_grad():  # larger weights than the 0.02 init: peaked logits, so no near-ties flip the argmax
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.to(dtype).eval()


def chain_model(vocab, chain):
    """A model that, after token chain[i], emits chain[i + 1] (cyclic): attention and MLP zeroed, so the residual is
    the token's embedding, one-hot per chain token; lm_head maps each one-hot to the next token."""
    assert len(set(chain)) == len(chain) <= 64
    model = Transformer(preset("llama-tiny", vocab_size=vocab))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.zero_()
        for i, t in enumerate(chain):
            model.embed_tokens.weight[t] = torch.nn.functional.one_hot(torch.tensor(i), 64).float()
            model.lm_head.weight[chain[(i + 1) % len(chain)], i] = 10.0
    return model.eval()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(random_model(tok.vocab_size), tok)


def full_forward_greedy(model, ids, n):
    """The slow reference: re-run the whole sequence for every new token, no cache."""
    ids, out, steps = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            steps.append(logits)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out, steps


# ---------------------------------------------------------------------------------------------------------------
# 1-2: cache and batching


def test_kv_cache_greedy_equals_full_forward(engine, tok):
    prompt = tok.encode("The quick brown fox")
    got = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))[0]
    want, _ = full_forward_greedy(engine.model, prompt, 20)
    assert got.token_ids == want
    assert got.finish_reason == "length" and got.prompt_tokens == len(prompt)
    assert got.text == tok.decode(want)


def test_batch_of_different_lengths_equals_each_alone(engine):
    prompts = ["hello", "What is the capital of France?", "A small model that writes text"]
    # different lengths of output too: rows finish at different steps and leave the batch
    greedy = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (15, 6, 10)]
    batch = engine.generate(prompts, greedy)
    alone = [engine.generate([p], g)[0] for p, g in zip(prompts, greedy)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in batch] == [15, 6, 10]

    seeded = [SamplingParams(seed=s, max_new_tokens=12, ignore_eos=True, top_p=0.9) for s in (1, 2, 3)]
    batch = engine.generate(prompts, seeded)
    alone = [engine.generate([p], s)[0] for p, s in zip(prompts, seeded)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    # the same seed in another batch composition (different neighbours, different position) gives the same tokens
    again = engine.generate([prompts[2], prompts[0]], [seeded[2], seeded[0]])
    assert [again[1].token_ids, again[0].token_ids] == [batch[0].token_ids, batch[2].token_ids]


def test_bfloat16_model_generates(tok):
    eng = Engine(random_model(tok.vocab_size, dtype=torch.bfloat16), tok)
    out = eng.generate(["hello", "The quick brown fox"], [GREEDY, SamplingParams(seed=0, max_new_tokens=5,
                                                                                  ignore_eos=True)])
    assert [len(c.token_ids) for c in out] == [12, 5]
    assert all(0 <= t < tok.vocab_size for c in out for t in c.token_ids)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_bfloat16_weights_on_cpu_compute_in_float32(name):
    """bf16 weights on a CPU are storage: activations stay float32, so outputs match a float32 model holding the
    same (bf16-rounded) weights, up to the rounding of each matrix product's input."""
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=97, **({"num_labels": 3} if name == "bert-tiny" else {}))
    bf = Transformer(cfg).to(torch.bfloat16).eval()
    fp = Transformer(cfg).eval()
    fp.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    ids = torch.randint(0, 97, (2, 9))
    head = "classify" if name == "bert-tiny" else "lm"
    with torch.inference_mode():
        a, b = bf(ids, head=head), fp(ids, head=head)
    assert bf.activation_dtype == torch.float32 and a.dtype == torch.float32
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_bfloat16_decode_equals_full_forward(tok):
    model = random_model(tok.vocab_size, dtype=torch.bfloat16)
    prompt = tok.encode("The quick brown fox")
    got = Engine(model, tok).generate([prompt], GREEDY)[0]  # one-row decode steps: the bf16 GEMV path
    want, _ = full_forward_greedy(model, prompt, 12)  # many rows: upcast weights, float32 GEMM
    assert got.token_ids == want


# ---------------------------------------------------------------------------------------------------------------
# 3: sampling


def test_seeded_sampling(engine):
    p = dict(max_new_tokens=16, ignore_eos=True)
    a = engine.generate(["hello"], SamplingParams(seed=7, **p))[0].token_ids
    assert engine.generate(["hello"], SamplingParams(seed=7, **p))[0].token_ids == a
    assert engine.generate(["hello"], SamplingParams(seed=8, **p))[0].token_ids != a
    greedy = engine.generate(["hello"], SamplingParams(temperature=0, **p))[0].token_ids
    assert engine.generate(["hello"], SamplingParams(top_k=1, seed=3, **p))[0].token_ids == greedy
    assert engine.generate(["hello"], SamplingParams(top_p=1e-6, seed=3, **p))[0].token_ids == greedy
    assert engine.generate(["hello"], SamplingParams(min_p=1.0, seed=3, **p))[0].token_ids == greedy


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    alive = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).tolist()
    assert alive(top_k=2) == [True, True, False, False]
    assert alive(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7
    assert alive(top_p=0.5) == [True, False, False, False]
    assert alive(min_p=0.4) == [True, True, False, False]  # threshold 0.2
    # temperature sharpens: 0.5 / 0.25 -> ratio 2 becomes 4 at T = 0.5
    p = filter_logits(logits, SamplingParams(temperature=0.5)).softmax(-1)
    assert math.isclose(float(p[0] / p[1]), 4.0, rel_tol=1e-5)
    # sampling only ever draws surviving tokens, with the expected frequencies
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits[None], SamplingParams(min_p=0.4), g)) for _ in range(600)]
    assert set(draws) == {0, 1} and 0.55 < draws.count(0) / 600 < 0.78


def test_penalties_match_hf_and_openai():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(50)
    prompt, output = [3, 4, 5], [5, 7, 7, 7]
    got = apply_penalties(logits, SamplingParams(repetition_penalty=1.3), prompt, output)
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[None].clone())[0]
    torch.testing.assert_close(got, want)
    got = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, output)
    want = logits.clone()
    want[5] -= 0.5 + 0.25
    want[7] -= 0.5 + 0.75  # OpenAI: mu - c * alpha_frequency - (c > 0) * alpha_presence
    torch.testing.assert_close(got, want)


def test_repetition_penalty_reduces_repeats(tok):
    eng = Engine(random_model(tok.vocab_size, seed=1), tok)
    p = dict(temperature=0, max_new_tokens=40, ignore_eos=True)
    plain = eng.generate(["hello"], SamplingParams(**p))[0].token_ids
    penalized = eng.generate(["hello"], SamplingParams(repetition_penalty=5.0, **p))[0].token_ids
    assert len(set(penalized)) > len(set(plain))
    freq = eng.generate(["hello"], SamplingParams(frequency_penalty=2.0, **p))[0].token_ids
    assert len(set(freq)) > len(set(plain))


def test_params_validation():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(min_p=2), dict(max_new_tokens=0),
                dict(repetition_penalty=0), dict(presence_penalty=3), dict(top_logprobs=-1), dict(stop=[""])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ["###"]


def test_context_limits(engine):
    ctx = engine.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt has {ctx} tokens but the model's context is {ctx}"):
        engine.generate([[5] * ctx])
    out = engine.generate([[5] * (ctx - 3)], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


# ---------------------------------------------------------------------------------------------------------------
# 4-5: stops and streaming (on a model that deterministically repeats a chosen text)


def repeater(tok, text, **kw):
    ids = tok.encode(text, add_special_tokens=False)
    return Engine(chain_model(tok.vocab_size, ids), tok, **kw), ids


def test_chain_model_repeats(tok):
    eng, ids = repeater(tok, "hello world, ")
    out = eng.generate([ids[:1]], SamplingParams(temperature=0, max_new_tokens=3 * len(ids) - 1))[0]
    assert tok.decode(ids[:1]) + out.text == "hello world, " * 3


@pytest.mark.parametrize("stop", ["world", "o w", ", h", "ld,"])
def test_stop_strings(tok, stop):
    eng, ids = repeater(tok, "hello world, ")
    p = SamplingParams(temperature=0, max_new_tokens=50, stop=["never", stop])
    full = "hello world, " * 5
    want = full[len(tok.decode(ids[:1])):]
    want = want[:want.find(stop)]
    out = eng.generate([ids[:1]], p)[0]
    assert out.text == want and out.finish_reason == "stop" and stop not in out.text
    pieces = list(eng.stream(ids[:1], p))
    assert "".join(pieces) == want
    assert not any(stop in piece for piece in pieces)


def test_held_back_prefix_is_released(tok):
    eng, ids = repeater(tok, "hello world, ")
    p = SamplingParams(temperature=0, max_new_tokens=2 * len(ids), stop=["world!", "hello there"])
    out = eng.generate([ids[:1]], p)[0]
    assert out.finish_reason == "length"
    assert out.text == tok.decode(out.token_ids)
    assert "".join(eng.stream(ids[:1], p)) == out.text


def test_eos_and_stop_token_ids(tok):
    ids = tok.encode("hello world", add_special_tokens=False)
    eos = tok.token_to_id("<|endoftext|>")
    eng = Engine(chain_model(tok.vocab_size, ids + [eos]), tok, generation_config={"eos_token_id": [eos]})
    out = eng.generate([ids[:1]], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[1:]
    assert out.text == tok.decode(ids[1:]) and "<|" not in out.text
    out = eng.generate([ids[:1]], SamplingParams(temperature=0, max_new_tokens=len(ids) + 2, ignore_eos=True))[0]
    assert out.finish_reason == "length" and eos in out.token_ids
    out = eng.generate([ids[:1]], SamplingParams(temperature=0, max_new_tokens=50, stop_token_ids=[ids[2]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[1:2]


def test_stream_matches_generate(engine):
    for p in (GREEDY, SamplingParams(seed=5, max_new_tokens=30, ignore_eos=True)):
        want = engine.generate(["The quick brown fox"], p)[0]
        run = engine.stream("The quick brown fox", p)
        pieces = []
        while True:
            try:
                pieces.append(next(run))
            except StopIteration as done:
                final = done.value
                break
        assert "".join(pieces) == want.text == final.text
        assert final.token_ids == want.token_ids


def test_a_stream_stopped_early_gives_its_kv_blocks_back(tok, monkeypatch):
    """Closing a stream after one piece, an exception in the consumer's loop, Ctrl-C inside a step, or Ctrl-C in a
    generate: each returns the rows' blocks at once; a pool that holds three requests serves a fourth afterwards
    (issue 20: the blocks stayed reserved, 4 -> 8 -> 12, until "the KV cache is held by other requests")."""
    model = random_model(tok.vocab_size)
    p = SamplingParams(temperature=0, max_new_tokens=56, ignore_eos=True)
    probe = Engine(model, tok, kv_cache_mb=1)
    need = probe.pool.blocks_for(len(tok.encode("The quick brown fox")) + p.max_new_tokens)
    eng = Engine(model, tok, kv_cache_mb=3 * need * probe.pool.block_bytes / 2**20)
    assert eng.pool.n_blocks == 3 * need
    want = eng.generate(["The quick brown fox"], p)[0]

    run = eng.stream("The quick brown fox", p)  # 1: the consumer closes the generator
    next(run)
    assert eng.pool.reserved == need
    run.close()
    assert eng.pool.reserved == 0

    with pytest.raises(RuntimeError, match="consumer"):  # 2: the consumer's loop raises
        for _ in eng.stream("The quick brown fox", p):
            raise RuntimeError("consumer stops")
    assert eng.pool.reserved == 0

    from llmkit.infer.engine import DecodeBatch

    real_step, calls = DecodeBatch.step, []

    def interrupted_step(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):  # 3: Ctrl-C while a stream's step runs
        list(eng.stream("The quick brown fox", p))
    assert eng.pool.reserved == 0
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # 4: Ctrl-C during a batched generate
        eng.generate(["The quick brown fox", "hello world"], p)
    assert eng.pool.reserved == 0
    monkeypatch.setattr(DecodeBatch, "step", real_step)

    out = eng.generate(["The quick brown fox"] * 3, p)  # the whole pool is free again
    assert [o.token_ids for o in out] == [want.token_ids] * 3
    assert eng.pool.reserved == 0


def test_chat_command_interrupted_replies_free_their_blocks(tok, monkeypatch):
    """`llmkit chat`: Ctrl-C while a reply is printed stops that reply, keeps the chat and frees its KV blocks
    before the next prompt; after three interrupts the fourth turn answers."""
    import io
    import sys
    from types import SimpleNamespace

    from llmkit import cli
    from llmkit.cli import common

    lm = SimpleNamespace(model=random_model(tok.vocab_size), tokenizer=tok, generation_config={}, path="tiny")
    monkeypatch.setattr(common, "load", lambda args, check=None: lm)
    engines, make_engine = [], common.engine
    monkeypatch.setattr(common, "engine", lambda *a, **k: engines.append(make_engine(*a, **k)) or engines[-1])
    reserved_at_prompt, lines = [], iter(["one", "two", "three", "four"])

    def read_line(prompt=""):
        reserved_at_prompt.append(engines[0].pool.reserved)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    class Out(io.StringIO):
        def write(self, s):
            if s != "\n" and len(reserved_at_prompt) <= 3:  # the first piece of turns 1-3: Ctrl-C
                raise KeyboardInterrupt
            return super().write(s)

    out = Out()
    monkeypatch.setattr("builtins.input", read_line)
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["chat", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    assert reserved_at_prompt == [0, 0, 0, 0, 0]  # before each of the four turns and at the end
    assert engines[0].pool.reserved == 0
    assert out.getvalue().strip()  # the fourth turn answered


def test_stream_never_splits_characters(tok):
    text = "héllo 👋🌍"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the emoji really are split over several byte tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    eng, ids = repeater(tok, "é👋")  # 2-byte and 4-byte characters, one byte per token
    assert len(ids) == 6
    pieces = list(eng.stream(ids[-1:], SamplingParams(temperature=0, max_new_tokens=18)))
    assert "".join(pieces) == "é👋" * 3
    assert not any("\ufffd" in p for p in pieces) and len(pieces) == 6


# ---------------------------------------------------------------------------------------------------------------
# 6: logprobs


def test_logprobs_are_log_softmax_of_the_logits(engine, tok):
    prompt = tok.encode("hello world")
    out = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6, logprobs=True,
                                                   top_logprobs=3, ignore_eos=True))[0]
    _, steps = full_forward_greedy(engine.model, prompt, 6)
    assert len(out.logprobs) == 6
    for t, entry, logits in zip(out.token_ids, out.logprobs, steps):
        lp = logits.log_softmax(-1)
        assert math.isclose(entry["logprob"], float(lp[t]), abs_tol=1e-4)
        assert entry["token"] == tok.decode([t])
        top = lp.topk(3).values.tolist()
        assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), b in zip(entry["top_logprobs"], top, strict=True))
        assert entry["top_logprobs"][0][0] == entry["token"]  # greedy picked the top one
    assert engine.generate([prompt], GREEDY)[0].logprobs is None


# ---------------------------------------------------------------------------------------------------------------
# chat and the real default model


def test_chat_uses_the_template(tok):
    eng = Engine(random_model(tok.vocab_size), tok)
    messages = [{"role": "user", "content": "hello"}]
    ids = eng.chat_prompt_ids(messages)
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    out = eng.chat(messages, GREEDY)
    assert out.token_ids == eng.generate([ids], GREEDY)[0].token_ids
    assert "".join(eng.chat(messages, GREEDY, stream=True)) == out.text


def test_default_model_knows_paris(default_lm):
    lm = default_lm
    eng = Engine(lm.model, lm.tokenizer, lm.generation_config)
    out = eng.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_new_tokens=16))
    assert "Paris" in out.text, out.text
    assert out.finish_reason in ("stop", "length") and "<|im_end|>" not in out.text
