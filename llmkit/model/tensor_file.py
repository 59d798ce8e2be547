"""safetensors files read one tensor at a time into memory the process owns.

safetensors' `load_file` and `safe_open` map the whole file, and every tensor they return is a view of that mapping:
the mapping (the size of the model) stays resident while any of them lives. A loader that builds a model layer by
layer from such tensors therefore peaks at the file plus every layer built so far (measured on the default model's
int4 folder: 535 MB peak against 432 MB once loaded). `TensorFile` reads each tensor with one `pread` into a fresh
buffer only when it is asked for, so a loader that drops each layer's tensors after building it peaks at the model
plus one layer, and nothing maps the file. The format (github.com/huggingface/safetensors, "Format"): an 8-byte
little-endian header size, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the data.
tests/model/test_tensor_file.py checks every tensor against safetensors' own reader.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class TensorFile(Mapping):
    """{name: tensor} of one or more safetensors files; a tensor is read from disk each time it is looked up."""

    def __init__(self, paths):
        self._where: dict[str, tuple] = {}  # name -> (path, dtype, shape, offset in file, bytes)
        for path in paths:
            self._index(Path(path))

    def _index(self, path: Path):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise ValueError(f"cannot read {path}: not a safetensors file (truncated or corrupt?)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"cannot read {path}: its header is not JSON (truncated or corrupt?)") from None
        if not isinstance(header, dict):
            raise ValueError(f"cannot read {path}: its header is not a JSON object")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"cannot read {path}: tensor {name!r} has a malformed or unknown entry") from None
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or 8 + n + end > size or any(d < 0 for d in shape):
                raise ValueError(f"cannot read {path}: tensor {name!r} does not fit the file (truncated or corrupt?)")
            self._where[name] = (path, dtype, shape, 8 + n + begin, nbytes)

    def __getitem__(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self._where[name]
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            fd = os.open(path, os.O_RDONLY)
            try:
                got = 0
                while got < nbytes:  # pread may return less than asked for
                    k = os.preadv(fd, [buf[got:]], offset + got)
                    if k <= 0:
                        raise ValueError(f"cannot read {path}: it ended inside tensor {name!r} (truncated?)")
                    got += k
            finally:
                os.close(fd)
        return out

    def __contains__(self, name) -> bool:  # without reading the tensor
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
