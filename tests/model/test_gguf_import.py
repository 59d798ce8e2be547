"""GGUF import: every quantization the issue names (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) loads with the same
logits as transformers' own GGUF loader, on a tiny Llama written in-process the way llama.cpp's converter writes it."""
import os

import numpy as np
import pytest
import torch

from llmkit.model.checkpoint import load_model

gguf = pytest.importorskip("gguf")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
Q = gguf.GGMLQuantizationType
N_EMBD, N_HEAD, N_KV, N_FF, VOCAB = 256, 4, 2, 512, 300


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: interleave the two RoPE halves of each head
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rows, cols, qtype, rng):
    """Random but well-formed K-quant blocks (gguf-py can dequantize K-quants but not produce them)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin as f16 at the start of each 144-byte block
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d as f16 at the end of each 210-byte block
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_tiny_llama(path, qtypes):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF), w.add_head_count(N_HEAD), w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0), w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default")
    tokens = [chr(0x100 + i) if i >= 256 else bytes([i]).decode("latin-1") for i in range(VOCAB - 1)] + ["ab"]
    w.add_token_list(tokens), w.add_token_types([1] * VOCAB), w.add_token_merges(["a b"])
    w.add_bos_token_id(1), w.add_eos_token_id(2)

    def add(name, shape, qtype, perm=None):
        x = rng.normal(0, 0.05, size=shape).astype(np.float32)
        if perm:
            x = permute(x, perm)
        if qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, k_quant_blocks(*shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    hd = N_EMBD // N_HEAD
    add("token_embd.weight", (VOCAB, N_EMBD), Q.Q8_0)
    add("output.weight", (VOCAB, N_EMBD), Q.Q6_K)
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + rng.normal(0, 0.1, N_EMBD)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + rng.normal(0, 0.1, N_EMBD)).astype(np.float32))
        add(f"blk.{i}.attn_q.weight", (N_HEAD * hd, N_EMBD), qtypes[0], perm=N_HEAD)
        add(f"blk.{i}.attn_k.weight", (N_KV * hd, N_EMBD), qtypes[1], perm=N_KV)
        add(f"blk.{i}.attn_v.weight", (N_KV * hd, N_EMBD), qtypes[2])
        add(f"blk.{i}.attn_output.weight", (N_EMBD, N_HEAD * hd), qtypes[3])
        add(f"blk.{i}.ffn_gate.weight", (N_FF, N_EMBD), qtypes[4])
        add(f"blk.{i}.ffn_up.weight", (N_FF, N_EMBD), qtypes[5])
        add(f"blk.{i}.ffn_down.weight", (N_EMBD, N_FF), qtypes[6])
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_all_named_quantizations_match_transformers(tmp_path):
    import transformers

    used = [Q.BF16, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0, Q.Q6_K]  # + F32 norms, Q8_0 embeddings, Q6_K output
    write_tiny_llama(tmp_path / "tiny.gguf", used)
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K} <= {t.tensor_type for t in reader.tensors}

    lm = load_model(tmp_path / "tiny.gguf", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, ref = lm.model(ids), hf.eval()(ids).logits
    assert ref.abs().max() > 0.1  # a real signal, not all zeros
    # logits up to ~900 here, so float32 rounding, not 1e-4 absolute: llmkit's RMSNorm sums its mean square in float64,
    # transformers' in float32 (measured at most 9.5e-4 = 1.1e-6 of the largest logit)
    assert (ours - ref).abs().max() <= 3e-6 * ref.abs().max()
    assert lm.config.n_kv_head == N_KV and not lm.config.tie_word_embeddings
