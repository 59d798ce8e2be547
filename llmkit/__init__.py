"""llmkit: data -> tokenizer -> pretraining -> fine-tuning -> compression -> evaluation -> serving.

The code lives in wings (llmkit/utils, model, infer, trust, data, eval, train, compress, serve, cli:
docs/dev/architecture.md); `import llmkit` imports none of them. The flat modules from before the wings
(`llmkit.engine`, `llmkit.server`, ...) still import for one release, each as its new module with a
DeprecationWarning: `_OldPaths` below aliases them. `llmkit.model`, `llmkit.data` and `llmkit.train` are packages
now; they forward the old modules' names with a `__getattr__` of their own (llmkit.utils.old_name).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

# old flat module -> its module in a wing (relative to llmkit); removed in the next release
_MOVED = {
    "api_models": "serve.protocol", "auto_dtype": "model.auto_dtype", "bias": "eval.bias",
    "checkpoint": "model.checkpoint", "clean": "data.clean", "cli_checks": "cli.checks",
    "cli_compress": "cli.compress", "cli_private": "cli.train", "cli_quantize": "cli.model", "cli_trust": "cli.trust",
    "compress_report": "compress.report", "config": "model.config", "constraints": "infer.constraints",
    "distill": "compress.distill", "embed": "infer.embed", "engine": "infer.engine", "evaluate": "eval.evaluate",
    "explain": "eval.explain", "federate": "train.federated", "finetune": "train.finetune",
    "gguf_export": "model.gguf_export", "grammar": "infer.grammar", "kvcache": "model.kvcache",
    "kvpool": "infer.kvpool", "lm_eval_model": "eval.lm_eval", "lora": "model.lora", "metrics": "eval.metrics",
    "names": "model.names", "pii": "trust.pii", "pretrain": "train.pretrain", "privacy": "train.dp",
    "prune": "compress.prune", "quantize": "model.quant", "routes_admin": "serve.routes.admin",
    "routes_chat": "serve.routes.chat", "routes_embeddings": "serve.routes.embeddings", "safety": "trust.guard",
    "sampling": "infer.sampling", "scheduler": "infer.scheduler", "serve_auth": "serve.auth",
    "serve_constraints": "serve.constraints", "serve_metrics": "serve.metrics", "serve_state": "serve.state",
    "server": "serve.app", "tokenizer": "model.tokenizer", "tokenizer_train": "data.tokenizer_train",
    "tools": "serve.tools",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `llmkit.<old>` for every old flat module and loads it as the module that replaced it (the same object,
    so patches and isinstance checks see one module). `python -m llmkit.<old>` runs the new module."""

    @staticmethod
    def _new(fullname: str) -> str | None:
        package, _, old = fullname.partition(".")
        return f"{__name__}.{_MOVED[old]}" if package == __name__ and old in _MOVED else None

    def find_spec(self, fullname, path=None, target=None):
        if self._new(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        from llmkit.utils import warn_moved

        new = self._new(spec.name)
        warn_moved(spec.name, new)
        return importlib.import_module(new)

    def exec_module(self, module):
        """Nothing to run: create_module returned the new module, already imported."""

    def get_code(self, fullname):
        from llmkit.utils import warn_moved

        new = self._new(fullname)
        warn_moved(fullname, new)
        spec = importlib.util.find_spec(new)
        return spec.loader.get_code(new)


if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
    sys.meta_path.append(_OldPaths())
