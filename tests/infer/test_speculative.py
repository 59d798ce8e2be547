"""Speculative decoding (infer/speculative.py through engine.DecodeBatch): the n-gram proposer, the accept rule, and
greedy output identical with speculation on and off (tiny models here; the real default model in
test_speculative_default.py)."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.infer.engine import Engine, SamplingParams
from llmkit.infer.speculative import NgramDrafter, Speculation, accepted_run, find_draft
from test_engine import chain_model, random_model, tok  # noqa: F401  (tok is a fixture)

SLOW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------------------------
# the proposer and the accept rule


@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 8), st.integers(1, 7))
def test_ngram_drafter_equals_plain_search(seq, k, grow):
    """The incremental index proposes what a plain search for the latest earlier n-gram proposes, at every length."""
    cut = max(1, len(seq) // 3)
    d = NgramDrafter(seq[:cut])
    for end in range(cut, len(seq) + 1, grow):
        assert d.propose(seq[cut:end], k, cut) == find_draft(seq[:end], k)


def test_ngram_drafter_finds_the_latest_occurrence():
    assert find_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # 3-gram: the later one
    assert find_draft([5, 6, 1, 2, 3], 4) == []  # no earlier occurrence of any 2..4-gram
    assert find_draft([1, 2, 7, 1, 2], 1, n_min=2) == [7]
    assert NgramDrafter([1, 2, 7, 1, 2]).propose([], 0, 5) == []


@given(st.lists(st.integers(0, 3), min_size=0, max_size=8), st.data())
def test_accepted_run(drafts, data):
    picks = data.draw(st.lists(st.integers(0, 3), min_size=len(drafts) + 1, max_size=len(drafts) + 1))
    run = accepted_run(drafts, picks)
    n = next((j for j, (d, p) in enumerate(zip(drafts, picks)) if d != p), len(drafts))
    assert run == picks[:n + 1]  # the drafts the model agrees with, then its own next token


def test_bad_settings_fail_clearly(tok):  # noqa: F811
    for k in (0, 17):
        with pytest.raises(ValueError, match="draft tokens"):
            Speculation("ngram", k)
    with pytest.raises(ValueError, match="'ngram'"):
        Speculation("medusa", 4)
    with pytest.raises(ValueError, match="exclude each other"):
        Engine(random_model(tok.vocab_size), tok, compile=True, speculative="ngram")


# ---------------------------------------------------------------------------------------------------------------
# speculation on == off


class OracleDrafts(Speculation):
    """Drafts from the known greedy answer, some corrupted: every acceptance length, stops inside a kept run."""

    def __init__(self, answers: dict, k: int, wrong: float, seed: int):
        super().__init__("ngram", k)
        self.answers, self.wrong, self.rng = answers, wrong, random.Random(seed)

    def drafter(self, state):
        base = super().drafter(state)
        return None if base is None else _Oracle(self, self.answers[tuple(state.prompt_ids)])


class _Oracle:
    def __init__(self, spec, answer):
        self.spec, self.answer = spec, answer

    def propose(self, generated, k, n_prompt):
        out = list(self.answer[len(generated):len(generated) + k])
        return [t if self.spec.rng.random() >= self.spec.wrong else (t + 1) % 300 for t in out]


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return random_model(tok.vocab_size)


@SLOW
@given(st.lists(st.lists(st.integers(3, 40), min_size=1, max_size=30), min_size=1, max_size=3),
       st.integers(1, 6), st.floats(0, 1), st.integers(1, 24), st.booleans(), st.integers(0, 2**16))
def test_oracle_drafts_give_the_same_tokens(model, tok, prompts, k, wrong, max_new, logprobs, seed):  # noqa: F811
    """Random prompts (one row, or several rows each alone: batch-invariant), drafts right or wrong at random: the
    tokens, text, finish reasons and logprobs equal plain greedy decoding's."""
    p = SamplingParams(temperature=0, max_new_tokens=max_new, logprobs=logprobs, top_logprobs=2 if logprobs else 0)
    bi = len(prompts) > 1  # several rows: each its own forward in both runs, so neighbours change nothing
    base = Engine(model, tok, kv_cache_mb=64, batch_invariant=bi).generate(prompts, p)
    answers = {tuple(q): c.token_ids for q, c in zip(prompts, base)}
    spec = OracleDrafts(answers, k, wrong, seed)
    eng = Engine(model, tok, kv_cache_mb=64, batch_invariant=bi)
    eng.speculation = spec
    got = eng.generate(prompts, p)
    for a, b in zip(base, got):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        if logprobs:
            assert a.logprobs == b.logprobs
    assert eng.pool.reserved == 0


@SLOW
@given(st.lists(st.integers(3, 12), min_size=2, max_size=40), st.integers(1, 16), st.integers(4, 40))
def test_ngram_on_equals_off(model, tok, prompt, k, max_new):  # noqa: F811
    p = SamplingParams(temperature=0, max_new_tokens=max_new)
    a = Engine(model, tok, kv_cache_mb=64).generate([prompt], p)[0]
    b = Engine(model, tok, kv_cache_mb=64, speculative="ngram", draft_tokens=k).generate([prompt], p)[0]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_copying_model_accepts_drafts_and_stops_where_plain_decoding_does(tok):  # noqa: F811
    """A model that repeats a cycle: after one turn, every draft is right; stop strings, stop ids and max tokens
    inside a kept run end the row exactly where one-token steps end it."""
    ids = list(dict.fromkeys(tok.encode("The capital of France is Paris. Hello world!")))[:12]
    model = chain_model(tok.vocab_size, ids)
    stop = tok.decode(ids[6:8]).strip()
    assert stop
    cases = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (1, 2, 7, 30)]
    cases += [SamplingParams(temperature=0, max_new_tokens=40, stop=[stop]),
              SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[ids[5]])]
    for p in cases:
        a = Engine(model, tok, kv_cache_mb=64).generate([ids], p)[0]
        eng = Engine(model, tok, kv_cache_mb=64, speculative="ngram", draft_tokens=5)
        b = eng.generate([ids], p)[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), p
    s = eng.speculation.stats
    assert s["accepted"] / s["drafted"] > 0.9 and s["emitted"] > 2 * s["steps"]


def test_stream_and_batch_with_other_rows(tok):  # noqa: F811
    """Speculating rows beside sampled and penalised rows (which do not speculate) and a row joining later."""
    ids = list(dict.fromkeys(tok.encode("The capital of France is Paris. Hello world!")))[:12]
    model = chain_model(tok.vocab_size, ids)
    greedy = SamplingParams(temperature=0, max_new_tokens=25, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=25, seed=3, ignore_eos=True)
    penal = SamplingParams(temperature=0, max_new_tokens=25, repetition_penalty=1.3, ignore_eos=True)
    prompts, params = [ids, ids[:5], ids[2:9]], [greedy, sampled, penal]
    a = Engine(model, tok, kv_cache_mb=64).generate(prompts, params)
    eng = Engine(model, tok, kv_cache_mb=64, speculative="ngram", draft_tokens=3)
    b = eng.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert "".join(eng.stream(ids, greedy)) == a[0].text
    assert eng.speculation.stats["accepted"] > 0


def test_quantized_rows_verify_in_the_shared_forward(tok):  # noqa: F811
    """int8 layers are row-invariant: verified rows share the forward with the others, and the tokens still equal."""
    from llmkit.model.quant import quantize_model

    model = random_model(tok.vocab_size)
    quantize_model(model, "int8")
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 9, 10, 11, 9], [20, 21]]
    p = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    a = Engine(model, tok, kv_cache_mb=64).generate(prompts[:1], p)
    eng = Engine(model, tok, kv_cache_mb=64, speculative="ngram", draft_tokens=4)
    assert eng.decode_batch().row_invariant
    assert a[0].token_ids == eng.generate(prompts[:1], p)[0].token_ids
    with torch.inference_mode():
        alone = [Engine(model, tok, kv_cache_mb=64, speculative="ngram").generate([q], p)[0].token_ids
                 for q in prompts]
    assert [c.token_ids for c in eng.generate(prompts, p)] == alone


# ---------------------------------------------------------------------------------------------------------------
# a draft model


@pytest.mark.parametrize("draft_seed", [0, 1], ids=["same-model", "other-model"])
def test_draft_model_gives_the_same_tokens(model, tok, draft_seed):  # noqa: F811
    """The model as its own draft (every draft kept) and an unrelated random model (drafts mostly rejected)."""
    draft = model if draft_seed == 0 else random_model(tok.vocab_size, seed=draft_seed)
    prompts = [[5, 6, 7, 8], [30, 31, 5, 6, 7, 9, 10, 11, 12, 13], [40]]
    p = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    for q in prompts:
        a = Engine(model, tok, kv_cache_mb=64).generate([q], p)[0]
        eng = Engine(model, tok, kv_cache_mb=64, speculative=draft, draft_tokens=5)
        b = eng.generate([q], p)[0]
        assert a.token_ids == b.token_ids
        s = eng.speculation.stats
        assert s["drafted"] > 0 and (draft_seed or s["accepted"] == s["drafted"] and s["steps"] <= 6), s
    with pytest.raises(ValueError, match="same tokenizer"):
        Engine(model, tok, speculative=random_model(tok.vocab_size + 1))


def test_cli_flags(tmp_path, capsys):
    from llmkit.cli import build_parser
    from llmkit.cli.common import params
    from llmkit.cli.serve import serve_config

    for bad in (["--draft-tokens", "17"], ["--draft-tokens", "x"], ["--draft-tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["generate", "hi", *bad])
        assert e.value.code == 2
    assert "1..16" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither 'ngram'"):  # the CLI's one-line error, exit 2
        params(build_parser().parse_args(["generate", "hi", "--speculative", str(tmp_path / "none")]))
    args = build_parser().parse_args(["serve", "--speculative", "ngram", "--draft-tokens", "6", "--port", "0"])
    cfg = serve_config(args)
    assert (cfg.speculative, cfg.draft_tokens) == ("ngram", 6)
    args = build_parser().parse_args(["chat", "--speculative", "ngram", "--compile", "on"])
    with pytest.raises(ValueError, match="exclude each other"):
        params(args)


def test_server_speculates_with_the_same_answer(tmp_path):
    import openai

    from helpers import make_tiny_model
    from llmkit.model.checkpoint import load_model
    from llmkit.serve.app import BackgroundServer, ServeConfig

    tiny = load_model(make_tiny_model(tmp_path / "tiny"), dtype="float32")
    msg = [{"role": "user", "content": "Hello there. Hello there. Hello there. Hello"}]
    answers = []
    for spec in (None, "ngram"):
        srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=4, speculative=spec))
        try:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.chat.completions.create(model="tiny", messages=msg, max_tokens=24, temperature=0)
            answers.append(r.choices[0].message.content)
        finally:
            srv.stop()
    assert answers[0] == answers[1]
