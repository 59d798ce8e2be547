"""The decode core (engine.DecodeBatch) driven directly, without HTTP: joins, cancels, blocks, prefix cache, packed and
chunked prefill, seeds, failures, logits processors."""
import json

import pytest
import torch

from llmkit.infer import engine as engine_mod
from llmkit.infer.constraints import json_object
from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model.transformer import PackedKV, RowKV
from test_engine import full_forward_greedy, random_model, tok  # noqa: F401  (tok is a fixture)

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return random_model(tok.vocab_size)


def make(model, tok, **kw):  # noqa: F811
    kw.setdefault("kv_cache_mb", 64)
    return Engine(model, tok, **kw)


def run(core, states, max_steps=500):
    """Step a core until every state finished; returns the events."""
    events = []
    for _ in range(max_steps):
        if all(s.finish_reason is not None for s in states):
            return events
        events += core.step()
    raise AssertionError("did not finish")


def test_packed_and_chunked_prefill_equal_plain_forward(model):
    torch.manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (9, 1, 23, 5)]
    with torch.inference_mode():
        want = [model(torch.tensor([s]), head="hidden")[0] for s in seqs]
        rows = [RowKV(model.config, 32) for _ in seqs]
        got = [[] for _ in seqs]
        done = [0] * len(seqs)
        for chunk in (4, 3, 100):  # uneven chunks: some rows finish early, the rest continue from their cache
            live = [i for i, s in enumerate(seqs) if done[i] < len(s)]
            parts = [seqs[i][done[i]:done[i] + chunk] for i in live]
            packed = PackedKV([rows[i] for i in live], [len(p) for p in parts])
            h = model(torch.tensor([sum(parts, [])]), cache=packed, head="hidden")[0]
            for i, p, s in zip(live, parts, packed.offsets):
                got[i].append(h[s:s + len(p)])
                done[i] += len(p)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.cat(g), w, atol=1e-5, rtol=1e-5)


def test_rows_join_and_leave_mid_batch_like_alone(model, tok):  # noqa: F811
    eng = make(model, tok, prefill_chunk=16)  # the long prompt is prefilled in chunks while others decode
    prompts = [tok.encode("hello"), tok.encode("What is the capital of France? " * 4), tok.encode("A small model")]
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (15, 6, 10)]
    alone = [eng.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    core = eng.decode_batch()
    states = [eng.new_state(p, q, q.max_new_tokens) for p, q in zip(prompts, params)]
    core.add(states[0])
    for _ in range(3):
        core.step()
    core.add(states[1])  # joins while row 0 decodes
    core.step()
    core.add(states[2])
    run(core, states)
    assert [s.token_ids for s in states] == alone
    assert alone[0] == full_forward_greedy(model, prompts[0], 15)[0]
    assert len(core) == 0 and eng.pool.reserved == 0


def test_growth_past_block_boundaries_and_blocks_returned(model, tok, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine_mod, "INITIAL_DECODE_ROOM", 1)  # the row's storage must grow many times
    eng = make(model, tok, block_size=4, prefix_caching=False)
    prompt = tok.encode("The quick brown fox")
    out = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0]
    assert out.token_ids == full_forward_greedy(model, prompt, 30)[0]
    assert eng.pool.usage()["reserved"] == 0 and eng.pool.usage()["cached"] == 0


def test_cancel_returns_blocks_at_once(model, tok):  # noqa: F811
    eng = make(model, tok, prefix_caching=False)
    core = eng.decode_batch()
    a = eng.new_state(tok.encode("hello"), GREEDY, 500)
    b = eng.new_state(tok.encode("A small model"), GREEDY, 8)
    core.add(a), core.add(b)
    held = eng.pool.reserved
    assert held == eng.pool.blocks_for(len(a.prompt_ids) + 500) + eng.pool.blocks_for(len(b.prompt_ids) + 8)
    core.step()
    core.cancel(a.id)
    assert a.finish_reason == "cancelled" and eng.pool.reserved == eng.pool.blocks_for(len(b.prompt_ids) + 8)
    run(core, [b])
    assert len(b.token_ids) == 8 and eng.pool.reserved == 0
    assert not any(ev.id == a.id for ev in core.step())


def test_prefix_cache_hit_equals_cold(model, tok):  # noqa: F811
    eng = make(model, tok, block_size=4)
    system = tok.encode("A small model that writes text one token at a time, with a cache of keys and values. " * 3)
    p = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=3)
    cold = eng.generate([system + tok.encode("hello")], p)[0]
    cache = eng.pool.cache
    assert len(cache) >= len(system) // 4 and cache.hits == 0
    warm = eng.generate([system + tok.encode("hello")], p)[0]
    assert cache.hits >= len(system) // 4 * 4  # the shared prefix came from the cache
    assert warm.token_ids == cold.token_ids
    for a, b in zip(warm.logprobs, cold.logprobs):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    # another question after the same system prompt also reuses it, and equals a cache-less engine
    other = eng.generate([system + tok.encode("What is the capital")], p)[0]
    plain = make(model, tok, prefix_caching=False).generate([system + tok.encode("What is the capital")], p)[0]
    assert other.token_ids == plain.token_ids


def test_n_choices_share_one_prefill(model, tok):  # noqa: F811
    eng = make(model, tok, prefix_caching=False)
    prompt = tok.encode("What is the capital of France?")
    seeded = [SamplingParams(seed=s, max_new_tokens=8, ignore_eos=True) for s in (1, 2, 3)]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[1]), with_kwargs=True)
    try:
        batch = eng.generate([prompt] * 3, seeded)
    finally:
        hook.remove()
    assert calls[0] == len(prompt)  # one prefill for the three choices
    alone = [eng.generate([prompt], s)[0].token_ids for s in seeded]
    assert [c.token_ids for c in batch] == alone


def test_seeded_request_same_alone_and_in_any_batch(model, tok):  # noqa: F811
    eng = make(model, tok, prefill_chunk=64)
    target = SamplingParams(seed=42, max_new_tokens=12, ignore_eos=True, top_p=0.9, temperature=0.8)
    alone = eng.generate(["A small model"], target)[0].token_ids
    others = ["hello", "What is the capital of France? The capital", "The quick brown fox jumps"]
    for k in range(len(others) + 1):
        prompts = others[:k] + ["A small model"] + others[k:]
        params = [SamplingParams(seed=k + i, max_new_tokens=5 + 3 * i, ignore_eos=True) for i in range(len(others))]
        params.insert(k, target)
        assert eng.generate(prompts, params)[k].token_ids == alone


def test_a_failing_row_does_not_fail_the_others(model, tok):  # noqa: F811
    eng = make(model, tok)

    class Boom:
        def __call__(self, logits, remaining):
            if remaining < 9:
                raise RuntimeError("processor exploded")
            return logits

        def accept(self, token_id):
            pass

    prompts = ["hello", "A small model"]
    p = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    good = eng.generate(prompts[1:], p)[0]
    out = eng.generate(prompts, p, processors=[[Boom()], []])
    assert out[0].finish_reason == "error" and "processor exploded" in out[0].error
    assert len(out[0].token_ids) == 4  # remaining 12, 11, 10, 9 went through; 8 raised
    assert out[1].token_ids == good.token_ids and out[1].finish_reason == "length"
    # the forward itself raises for batches holding one poisoned token: the batch is retried row by row
    poison = tok.encode("hello")[0]

    def hook(m, args, kwargs):
        if poison in args[0][0].tolist():
            raise RuntimeError("bad row")

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = eng.generate(prompts, p)
    finally:
        h.remove()
    assert out[0].finish_reason == "error" and "bad row" in out[0].error
    assert out[1].token_ids == good.token_ids
    assert eng.pool.reserved == 0


def test_pool_bounds_memory_requests_wait_or_fail(model, tok):  # noqa: F811
    eng = make(model, tok, block_size=4, prefix_caching=False)
    per_block_mb = eng.pool.block_bytes / 2**20
    small = make(model, tok, block_size=4, kv_cache_mb=per_block_mb * 12)  # 48 tokens
    prompts = ["hello", "A small model", "The quick brown"]
    p = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    # each needs ~9 blocks of 12: they run one after another, with the same results
    assert [c.token_ids for c in small.generate(prompts, p)] == [c.token_ids for c in eng.generate(prompts, p)]
    assert small.pool.reserved == 0 and small.pool.cached <= small.pool.n_blocks
    with pytest.raises(ValueError, match="KV cache"):
        small.generate(["hello"], SamplingParams(max_new_tokens=100, ignore_eos=True))


def test_json_processor_output_parses(model, tok):  # noqa: F811
    eng = make(model, tok)
    for seed in (None, 3):
        p = SamplingParams(temperature=0 if seed is None else 1.0, seed=seed, max_new_tokens=40)
        out = eng.generate(["hello"], p, processors=[[json_object(eng)]])[0]
        assert isinstance(json.loads(out.text), dict), out.text


_MEMORY_PROBE = """
import gc, json
import psutil, torch
from llmkit.model.config import preset
from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model.transformer import Transformer

cfg = preset("llama-tiny", vocab_size=256, n_layer=12, n_head=8, n_kv_head=8, n_embd=512,
             max_position_embeddings=4096)
torch.manual_seed(0)
eng = Engine(Transformer(cfg).eval(), None, kv_cache_mb=1024, prefix_caching=False)
row_mb = eng.pool.token_bytes * 3000 / 2**20  # 141 MB of keys/values for this request
p = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
proc = psutil.Process()
for _ in range(2):  # warm-up: allocator and torch caches reach their steady state
    eng.generate([[1] * 3000], p)
gc.collect()
idle = proc.memory_info().rss
core = eng.decode_batch()
st = eng.new_state([1] * 3000, p, 2)
core.add(st)
core.step()
held = proc.memory_info().rss - idle
for _ in range(100):
    if st.finish_reason is not None:
        break
    core.step()
gc.collect()
after = proc.memory_info().rss - idle
print(json.dumps({"row": row_mb * 2**20, "held": held, "after": after, "reserved": eng.pool.reserved}))
"""


def test_memory_returns_to_idle_after_a_long_request():
    """The process's memory after a long request is back at its idle level (no cache kept at full length).

    Measured in a process of its own: threads left by other tests would move this one's RSS."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(m)
    assert m["held"] > 0.5 * m["row"]  # the row really held its keys and values ...
    assert m["after"] < 0.25 * m["row"] and m["reserved"] == 0  # ... and gave them back
