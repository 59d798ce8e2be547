"""An encoder (BERT-style) served: /v1/embeddings mean-pools its last hidden states over the non-padding tokens, as
sentence-embedding servers do (equal to transformers' BertModel within 1e-4), normalised unless the request says
`"normalize": false`; chat and completions answer a 400 that says the model is an encoder; `llmkit serve` starts it."""
from pathlib import Path

import httpx
import pytest
import torch

from helpers import make_tiny_bert
from llmkit.cli import main
from llmkit.serve.app import BackgroundServer, ServeConfig

SHAKESPEARE = Path(__file__).parents[1] / "data" / "tinyshakespeare_head.txt"
TEXTS = ["To be, or not to be: that is the question.", "Now is the winter", "O Romeo, Romeo! wherefore art thou "
         "Romeo? Deny thy father and refuse thy name."]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def server(bert_dir):
    srv = BackgroundServer(ServeConfig(models={"bert": str(bert_dir)}, port=0, dtype="float32"))
    yield srv
    srv.stop()


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def reference(bert_dir, texts, normalize=True):
    """transformers' BertModel: last_hidden_state averaged over the attention mask (a right-padded batch)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
    tok.padding_side = "right"  # BERT's absolute positions start at the first token (a pretrain folder pads left)
    model = transformers.BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    v = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(v, dim=-1) if normalize else v


def vectors(r) -> torch.Tensor:
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return torch.tensor([d["embedding"] for d in data])


@pytest.mark.parametrize("normalize", [True, False])
def test_embeddings_are_the_mean_over_real_tokens_of_bert(server, bert_dir, normalize):
    body = {"model": "bert", "input": TEXTS} | ({} if normalize else {"normalize": False})
    got = vectors(post(server, "/v1/embeddings", body))
    want = reference(bert_dir, TEXTS, normalize)
    assert got.shape == (len(TEXTS), 32)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    norms = got.norm(dim=-1)
    if normalize:
        assert torch.allclose(norms, torch.ones(len(TEXTS)), atol=1e-5)
    else:
        assert not torch.allclose(norms, torch.ones(len(TEXTS)), atol=1e-2)


def test_a_batch_gives_each_input_its_vector_alone(server):
    together = vectors(post(server, "/v1/embeddings", {"input": TEXTS, "normalize": False}))
    alone = torch.cat([vectors(post(server, "/v1/embeddings", {"input": t, "normalize": False})) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)


def test_usage_base64_and_dimensions(server):
    r = post(server, "/v1/embeddings", {"input": TEXTS[:2], "dimensions": 8})
    v = vectors(r)
    assert v.shape == (2, 8) and torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] > 0 and r.json()["model"] == "bert"
    r = post(server, "/v1/embeddings", {"input": "Now is the winter", "encoding_format": "base64"})
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], str)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "bert", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("/v1/completions", {"model": "bert", "prompt": "hi", "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": True}),
])
def test_generation_on_an_encoder_is_a_clear_400(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "model"
    assert "encoder" in err["message"] and "/v1/embeddings" in err["message"]


def test_models_tokenize_metrics_and_health(server):
    r = httpx.get(server.url + "/v1/models", timeout=30)
    assert [m["id"] for m in r.json()["data"]] == ["bert"] and r.json()["data"][0]["max_model_len"] == 64
    assert post(server, "/tokenize", {"prompt": "Now is the winter"}).json()["count"] > 2
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200


def test_encoder_beside_a_decoder(bert_dir, tmp_path):
    from helpers import make_tiny_model

    srv = BackgroundServer(ServeConfig(models={"tiny": str(make_tiny_model(tmp_path)), "bert": str(bert_dir)},
                                       port=0, dtype="float32"))
    try:
        r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert post(srv, "/v1/completions", {"model": "bert", "prompt": "hi", "max_tokens": 2}).status_code == 400
        assert vectors(post(srv, "/v1/embeddings", {"model": "bert", "input": "hi"})).shape == (1, 32)
        assert vectors(post(srv, "/v1/embeddings", {"model": "tiny", "input": "hi"})).shape[0] == 1
    finally:
        srv.stop()


def test_llmkit_serve_starts_an_encoder(bert_dir, monkeypatch):
    import llmkit.serve.app as app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda cfg, sock=None: seen.update(cfg=cfg, sock=sock))
    assert main(["serve", "--model", f"enc={bert_dir}", "--port", "0", "--device", "cpu"]) == 0
    seen["sock"].close()
    lm = seen["cfg"].models["enc"]
    assert not lm.config.causal and lm.tokenizer is not None


def test_a_pretrained_mlm_folder_serves_embeddings(tmp_path):
    out = tmp_path / "mlm"
    assert main(["pretrain", "--data", str(SHAKESPEARE), "--out", str(out), "--objective", "mlm", "--vocab-size", "300",
                 "--block-size", "32", "--batch-size", "8", "--max-steps", "2", "--eval-every", "0",
                 "--warmup-steps", "1", "--no-progress", "--log-every", "1"]) == 0
    srv = BackgroundServer(ServeConfig(models={"mlm": str(out)}, port=0, dtype="float32"))
    try:
        got = vectors(post(srv, "/v1/embeddings", {"input": TEXTS}))
        assert torch.allclose(got, reference(out, TEXTS), atol=1e-4), (got - reference(out, TEXTS)).abs().max()
        assert post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).status_code == 400
    finally:
        srv.stop()
