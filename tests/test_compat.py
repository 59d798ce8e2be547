"""The old flat import paths (before the wings) keep working for one release, each with a DeprecationWarning, and
cost nothing when unused: `import llmkit` imports no wing, and `llmkit --help` does not import torch. Every check runs
in a fresh interpreter, where nothing is imported or warned yet."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())

# the flat modules of llmkit/ before the wings (issue 21); model, data and train are packages now (see below)
OLD = ("api_models auto_dtype bias checkpoint clean cli_checks cli_compress cli_private cli_quantize cli_trust "
       "compress_report config constraints distill embed engine evaluate explain federate finetune gguf_export "
       "grammar kvcache kvpool lm_eval_model lora metrics names pii pretrain privacy prune quantize routes_admin "
       "routes_chat routes_embeddings safety sampling scheduler serve_auth serve_constraints serve_metrics serve_state "
       "server tokenizer tokenizer_train tools").split()
# the packages that replaced an old module of the same name, and the module that holds the old module's names
PACKAGES = {"model": "transformer", "data": "corpus", "train": "loop"}


def _run(code: str, *args: str, timeout: int = 120) -> dict:
    """Run code in a fresh interpreter (from the repository root); it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _module_file(dotted: str) -> Path:
    base = ROOT / Path(*dotted.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


def test_every_old_module_has_a_home():
    import llmkit

    assert sorted(llmkit._MOVED) == sorted(OLD)
    missing = [f"llmkit.{old} -> llmkit.{new}" for old, new in llmkit._MOVED.items()
               if not _module_file(f"llmkit.{new}").is_file()]
    missing += [f"llmkit.{p} -> llmkit.{p}.{home}" for p, home in PACKAGES.items()
                if not _module_file(f"llmkit.{p}.{home}").is_file()]
    assert not missing, "old paths whose new module does not exist: " + ", ".join(missing)


def test_import_llmkit_imports_no_wing():
    out = _run("""
        import json, sys
        import llmkit
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("llmkit."))))
    """)
    assert out == []


def test_help_does_not_import_torch():
    out = _run("""
        import json, runpy, sys
        sys.argv = ["llmkit", "--help"]
        try:
            runpy.run_module("llmkit", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        print(json.dumps({"exit": code, "torch": "torch" in sys.modules}))
    """)
    assert out == {"exit": 0, "torch": False}


def test_old_imports_work_and_warn():
    out = _run("""
        import json, sys, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import llmkit.engine
            from llmkit.server import create_app
            from llmkit import safety
            from llmkit.model import Transformer
            import llmkit.train
            loop_config = llmkit.train.TrainConfig
        import llmkit.infer.engine, llmkit.serve.app, llmkit.trust.guard, llmkit.model.transformer, llmkit.train.loop
        same = [llmkit.engine is llmkit.infer.engine, create_app is llmkit.serve.app.create_app,
                safety is llmkit.trust.guard, Transformer is llmkit.model.transformer.Transformer,
                loop_config is llmkit.train.loop.TrainConfig]
        warned = [(w.category.__name__, w.filename, str(w.message)) for w in caught]
        print(json.dumps({"same": same, "warned": warned}))
    """)
    assert out["same"] == [True] * 5
    assert [(c, f) for c, f, _ in out["warned"]] == [("DeprecationWarning", "<string>")] * 5, out["warned"]
    messages = [m.split(" is deprecated: it moved to ") for _, _, m in out["warned"]]
    assert [m[0] for m in messages] == ["llmkit.engine", "llmkit.server", "llmkit.safety", "llmkit.model.Transformer",
                                        "llmkit.train.TrainConfig"]
    assert [m[1].split(" ")[0] for m in messages] == ["llmkit.infer.engine", "llmkit.serve.app", "llmkit.trust.guard",
                                                      "llmkit.model.transformer.Transformer",
                                                      "llmkit.train.loop.TrainConfig"]


def test_every_old_path_imports():
    out = _run("""
        import importlib, json, sys, warnings
        warnings.simplefilter("ignore")
        import llmkit
        bad = {}
        for old, new in llmkit._MOVED.items():
            try:
                if importlib.import_module("llmkit." + old) is not importlib.import_module("llmkit." + new):
                    bad[old] = "not the new module"
            except Exception as e:
                bad[old] = repr(e)
        print(json.dumps(bad))
    """, timeout=300)
    assert out == {}


def test_new_paths_and_submodules_do_not_warn():
    out = _run("""
        import json, warnings
        warnings.simplefilter("error")
        from llmkit.model import config, transformer
        from llmkit.data import corpus
        from llmkit.train import loop
        from llmkit.infer.engine import Engine
        import llmkit.model
        try:
            llmkit.model.no_such_name
        except AttributeError as e:
            missing = str(e)
        print(json.dumps({"config": config.__name__, "missing": missing}))
    """)
    assert out == {"config": "llmkit.model.config", "missing": "module 'llmkit.model' has no attribute 'no_such_name'"}


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_old_module_runs_with_dash_m():
    r = subprocess.run([sys.executable, "-m", "llmkit.lm_eval_model", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "lm-eval" in r.stdout, r.stderr[-2000:]
