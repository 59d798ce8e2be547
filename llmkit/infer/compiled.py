"""The batch-1 decode step compiled ahead of time (AOTInductor), built once per model structure and machine.

In eager mode a one-token step of the default model runs ~1,800 small ops (norms, RoPE, casts, KV writes, SiLU x up,
residual adds) around its 120 int4 products, a microsecond or more each: about half the step. torch.export traces
the step (every layer, the KV writes, attention) into one graph; AOTInductor compiles it to a shared library whose
generated C++ fuses the glue around torch's own int4/int8 and attention kernels (extern calls, the same kernels as
eager). Measured on the default model on a 2-core EPYC: a step's hidden states in 3.9 ms against 9.8 ms eager.

- The weights are inputs of the graph, not constants baked into the library: the library holds code only (a few MB),
  reads the model's own tensors (no second copy in memory), and one library serves every model of the same structure.
- Shapes: one token, one row; the row's KV capacity and the number of stored tokens are dynamic, so a growing row and
  every context length reuse the library. Each layer's keys and values are separate inputs written in place
  (index_copy_ at the new slot), so nothing is copied but the new token's.
- The library is cached in $LLMKIT_HOME/compiled/<key>.pt2; the key hashes the model's structure (config, tensor names,
  shapes, dtypes), the torch version, the CPU's capability and llmkit's model code, so any change builds a new one.
  A build takes about 45 s on 2 cores (export ~5 s, C++ compilation the rest); loading takes milliseconds.
- Which rows take it is fixed by the request, never by a timing: a row decoding one token alone (batch 1, no draft
  tokens). Batches, prompts and speculative verification run eagerly (their products are large enough that the glue
  matters little).
- It computes what eager decoding computes, bit for bit: the products, attention and the int4/int8 kernels are the
  same kernels; pointwise ops round the same (no fused multiply-adds: fp-contract off, no unsafe math); the one
  reduction, RMSNorm's mean square, is summed in float64 and rounded to float32 once in both modes, so the order
  inductor's generated loop sums in changes it only if the float64 sums (relative error below 1e-13) straddle a
  float32 rounding boundary (spacing 6e-8). Before that, float32 sums in two orders differed by up to 1.8e-7 and a
  greedy answer parted at a near-tie. Tested: 40 teacher-forced steps of the default model equal to the bit, and the
  same greedy answers.

`python -m llmkit.infer.compiled --model M --dtype D` builds the library for a model (what `--compile auto` starts in
the background, niced, when none is cached).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.checkpoint import llmkit_home
from llmkit.model.kvcache import PackedKV, PackedLayer, RowKV

CODE = [Path(__file__)] + [Path(__file__).parents[1] / "model" / f for f in
                           ("transformer.py", "kvcache.py", "linear.py", "quant.py", "config.py")]
FORMAT = 2  # bump when the step's inputs or shapes change


def compiled_dir() -> Path:
    return llmkit_home() / "compiled"


# ---------------------------------------------------------------------------------------------------------------
# The traced step: the model's own forward on a one-row cache whose length is symbolic


class _StepKV(PackedKV):
    """One row, one new token at slot `slot`, n = stored + 1 tokens attended (n is the size of a dummy input)."""

    def __init__(self, ks, vs, slot, n):  # noqa: D107 (no PackedKV.__init__: nothing of its bookkeeping applies)
        self.ks, self.vs, self.slot, self.n = ks, vs, slot, n
        self.rows, self.counts, self.offsets, self.masks, self._positions = [None], [1], [0, 1], [None], None

    def positions(self, device=None):
        return torch.arange(self.n - 1, self.n, device=device)[None]

    def layer(self, i: int):
        return _StepLayer(self, i)

    def advance(self):
        pass  # CompiledStep counts the token once the library ran


class _StepLayer(PackedLayer):
    def attend(self, q, k, v, enable_gqa: bool):
        p, n = self.packed, self.packed.n
        kc, vc = p.ks[self.i], p.vs[self.i]  # (Hkv, capacity, D)
        kc.index_copy_(1, p.slot, k[0])
        vc.index_copy_(1, p.slot, v[0])
        return F.scaled_dot_product_attention(q, kc[:, :n][None], vc[:, :n][None], enable_gqa=enable_gqa)


class _Step(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names, self.tensors = step_tensors(model)

    def forward(self, ids, slot, ks, vs, ctx, tensors):
        cache = _StepKV(ks, vs, slot, ctx.shape[0])
        return torch.func.functional_call(self.model, dict(zip(self.names, tensors)), (ids,),
                                          {"cache": cache, "head": "hidden"}, tie_weights=False, strict=True)


def step_tensors(model) -> tuple[list[str], list[torch.Tensor]]:
    """Every parameter and buffer the forward may read, by name (shared ones under each of their names)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    names = [n for n, t in named.items() if t is not None]
    return names, [named[n] for n in names]


def step_key(model) -> str:
    """What the library depends on: model structure, torch, the CPU's vector capability, llmkit's model code."""
    names, tensors = step_tensors(model)
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "torch": torch.__version__, "machine": platform.machine(),
                         "cpu": torch.backends.cpu.get_cpu_capability(),
                         "config": model.config.to_dict()}, sort_keys=True, default=str).encode())
    for n, t in zip(names, tensors):
        h.update(f"{n}:{tuple(t.shape)}:{tuple(t.stride())}:{t.dtype}:{t.device.type};".encode())
    for f in CODE:
        h.update(f.read_bytes())
    return h.hexdigest()[:24]


def max_capacity(cfg) -> int:
    """The largest KV capacity the library takes: a row's capacity grows in whole blocks, so it may pass the context."""
    return cfg.max_position_embeddings + 4096


def supported(model) -> str | None:
    """Why the compiled step cannot serve this model, or None when it can."""
    cfg = model.config
    if not cfg.causal or cfg.position != "rope" or not cfg.pre_norm:
        return "the compiled step covers rotary pre-norm decoders"
    if next(model.parameters()).device.type != "cpu":
        return "the compiled step is built for CPUs (GPU decoding runs eagerly)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Build and load


def build(model, path: Path, log=None) -> Path:
    """Export and compile the step for this model into path (atomically: a reader never sees half a file)."""
    import torch._inductor
    from torch.export import Dim, export
    from torch.export.graph_signature import InputKind

    why = supported(model)
    if why:
        raise ValueError(why)
    model.eval().fuse_for_decode()
    cfg = model.config
    step = _Step(model)
    cap = min(64, cfg.max_position_embeddings)
    ks = [torch.zeros(cfg.n_kv_head, cap, cfg.head_dim, dtype=model.activation_dtype) for _ in range(cfg.n_layer)]
    vs = [torch.zeros_like(k) for k in ks]
    n, c = Dim("n", min=2, max=cfg.max_position_embeddings), Dim("capacity", min=2, max=max_capacity(cfg))
    args = (torch.tensor([[0]]), torch.tensor([9]), ks, vs, torch.empty(10), step.tensors)
    shapes = {"ids": None, "slot": None, "ks": [{1: c}] * len(ks), "vs": [{1: c}] * len(vs), "ctx": {0: n},
              "tensors": [None] * len(step.tensors)}
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))  # torch's own, about its internals
        ep = export(step, args, dynamic_shapes=shapes, strict=False)
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    baked = [s.target for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT and s.arg.name in used]
    if baked:  # a tensor the forward reads from elsewhere than the inputs would be frozen into the library
        raise ValueError(f"the step reads tensors that are not the model's parameters or buffers: {baked[:3]}")
    if log:
        log(f"exported the decode step in {time.perf_counter() - t0:.1f} s; compiling it (C++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        # no fused multiply-adds and no unsafe math whatever the environment says: the generated code must compute
        # what the eager kernels compute (torch's own defaults, pinned)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs={
                "cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    prune(path.parent, keep=KEEP)
    return path


KEEP = 8  # libraries kept in $LLMKIT_HOME/compiled (each ~8 MB; a new llmkit or torch version makes new ones)


def prune(folder: Path, keep: int = KEEP) -> list[Path]:
    """Delete all but the `keep` most recently used libraries (loading one marks it used) and their lock and failure
    files; returns what was deleted."""
    libs = sorted(folder.glob("*.pt2"), key=lambda f: f.stat().st_mtime, reverse=True)
    gone = []
    for lib in libs[keep:]:
        for f in (lib, lib.with_name(lib.name + ".lock"), lib.with_name(lib.name + ".failed")):
            f.unlink(missing_ok=True)
        gone.append(lib)
    return gone


class CompiledStep:
    """A loaded library: step(token, row) -> hidden state (1, C) of the row's next token, stored into the row."""

    failed = False  # set by the decode core when a call raised: decoding goes on eagerly

    def __init__(self, model, path: Path):
        self.path = Path(path)
        self.tensors = step_tensors(model)[1]  # passed in step_tensors' order, the order the graph was traced in
        # torch's C++ loader straight away: torch._inductor (what aoti_load_package imports) takes a second to import
        self._run = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1).boxed_run
        try:
            os.utime(self.path)  # used now: prune() keeps the most recently used
        except OSError:
            pass
        cfg = model.config
        self.max_len, self.max_capacity = cfg.max_position_embeddings, max_capacity(cfg)
        self._ctx = torch.empty(self.max_len)

    def fits(self, kv: RowKV) -> bool:
        """The shapes the library was exported for (others run eagerly, with the same numbers)."""
        return 1 <= kv.length and kv.length + 1 <= min(kv.capacity, self.max_len) and kv.capacity <= self.max_capacity

    def __call__(self, token: int, kv: RowKV) -> torch.Tensor:
        views = kv.__dict__.get("_layer_views")
        if views is None or views[0] is not kv.k:  # per-layer views, rebuilt when the row grows
            views = kv.__dict__["_layer_views"] = (kv.k, list(kv.k.unbind(0)), list(kv.v.unbind(0)))
        n = kv.length + 1
        out = self._run([torch.tensor([[token]]), torch.tensor([kv.length]), *views[1], *views[2], self._ctx[:n],
                         *self.tensors])
        kv.length = n
        return out[0][0]  # (1, C)


def load(model, build_now: bool = False, log=None) -> CompiledStep | None:
    """The cached library for this model, built first when build_now; None when none is cached (or it cannot be)."""
    if supported(model):
        return None
    path = compiled_dir() / f"{step_key(model)}.pt2"
    if not path.exists():
        if not build_now:
            return None
        with _lock(path, wait=True):  # another process building it: wait for it, then use its library
            if not path.exists():
                build(model, path, log)
    return CompiledStep(model, path)


def describe(model) -> str:
    """One line for `llmkit info`: the library's path if built, else whether and how it would be."""
    why = supported(model)
    if why:
        return f"no ({why})"
    path = package_path(model.eval().fuse_for_decode())
    if path.exists():
        return f"built: {path}"
    if building(model):
        return "being built in the background"
    return "not built yet (chat, generate and serve build it in the background)" if can_build() else \
        "not built, and no C++ compiler to build it (decoding is eager)"


def package_path(model) -> Path | None:
    """Where this model's library is or would be cached (None if the model is not supported)."""
    return None if supported(model) else compiled_dir() / f"{step_key(model)}.pt2"


class _lock:
    """An exclusive lock on path + ".lock" (fcntl): one builder per library across processes."""

    def __init__(self, path: Path, wait: bool = False):
        self.file, self.wait = path.with_name(path.name + ".lock"), wait

    def __enter__(self) -> bool:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.file, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def building(model) -> bool:
    """True while some process holds this model's build lock."""
    path = package_path(model)
    if path is None:
        return False
    with _lock(path) as held:
        return not held


def can_build() -> bool:
    """A C++ compiler is on PATH (AOTInductor needs one to build; loading a built library needs none)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "g++", "clang++", "c++"))


def build_in_background(model_spec: str, dtype: str, log_path: Path | None = None) -> subprocess.Popen:
    """Start `python -m llmkit.infer.compiled` at the lowest CPU priority, detached: this process does not wait."""
    log_path = log_path or compiled_dir() / "build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        cmd = [sys.executable, "-m", "llmkit.infer.compiled", "--model", model_spec, "--dtype", dtype]
        return subprocess.Popen(cmd,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                preexec_fn=lambda: os.nice(19))


def build_if_missing(engine, model_spec, dtype: str) -> str | None:
    """For an Engine(compile="cached") without a library: start its build in the background (unless one is running
    or no compiler is there); returns what to tell the user, or None when there is nothing to say."""
    if engine.step is not None or engine.step_path is None or engine.step_path.exists():
        return None
    if building(engine.model):
        return "the compiled decode step is being built in the background; it is used as soon as it is ready"
    if not isinstance(model_spec, (str, os.PathLike)) or not can_build():
        return None
    failed = engine.step_path.with_name(engine.step_path.name + ".failed")
    if failed.exists():  # not retried at every start: delete the marker (or run --compile on) to try again
        return f"the compiled decode step failed to build here ({failed}); decoding is eager"
    build_in_background(str(model_spec), dtype or "auto")
    return ("building the compiled decode step for this machine in the background (once, about a minute, at low "
            "priority); decoding is eager until it is ready (--compile off: never build it)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the compiled batch-1 decode step of a model for this machine.")
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    from llmkit.model.checkpoint import load_model

    model = load_model(args.model, dtype=args.dtype).model
    t0 = time.perf_counter()
    try:
        step = load(model, build_now=True, log=lambda m: print(m, flush=True))
    except Exception as e:  # the background build's failure: remembered, so that starts do not retry it every time
        path = package_path(model)
        if path is not None:
            path.with_name(path.name + ".failed").write_text(f"{type(e).__name__}: {e}\n")
        raise
    if step is None:
        print(f"not built: {supported(model)}", flush=True)
        return 1
    print(f"{step.path} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
