"""model.tensor_file: safetensors read a tensor at a time, equal to safetensors' own reader; bad files are refused."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llmkit.model.tensor_file import TensorFile

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6))
def test_equal_to_safetensors(tmp_path_factory, specs):
    path = tmp_path_factory.mktemp("tf") / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(shape, generator=g) * 50).to(dt) for i, (dt, shape) in enumerate(specs)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    ref, ours = load_file(str(path)), TensorFile([path])
    assert set(ours) == set(ref) and len(ours) == len(ref)
    for k, v in ref.items():
        got = ours[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v)
        if got.numel():
            assert got.data_ptr() != ours[k].data_ptr()  # a fresh buffer each time, never a mapping of the file


def test_bad_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    for name, raw in {"truncated": data[:-100], "empty": b"", "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
                      "huge header": (2**40).to_bytes(8, "little") + b"{}"}.items():
        p = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        p.write_bytes(raw)
        with pytest.raises(ValueError, match="cannot read"):
            TensorFile([p])


def test_quantized_folder_loads_without_mapping_the_file(tmp_path, monkeypatch):
    """A quantized folder's layers are read as they are built: model.safetensors is never mapped while they are (a
    mapping of the whole file would stay resident through the build: the peak RSS this reader removes)."""
    from llmkit.model import quant, quant_io
    from llmkit.model.checkpoint import load_model, save_model
    from tests.helpers import make_tiny_model

    model = load_model(make_tiny_model(tmp_path / "f")).model
    quant.quantize_model(model, "int8", 32)
    save_model(tmp_path / "q", model)
    weights, mapped = str(tmp_path / "q" / "model.safetensors"), []
    install = quant_io.install_group

    def watched(*args, **kwargs):  # called once per layer group as the model is built
        mapped.append(weights in open(f"/proc/{os.getpid()}/maps").read())
        return install(*args, **kwargs)

    monkeypatch.setattr(quant_io, "install_group", watched)
    lm = load_model(tmp_path / "q")
    if os.path.exists(f"/proc/{os.getpid()}/maps"):
        assert mapped and not any(mapped)
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.inference_mode():
        assert torch.allclose(lm.model(x), model(x), atol=1e-5)
