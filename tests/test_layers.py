"""The architecture as tests (docs/dev/architecture.md): an AST pass over every module of llmkit/ reads what each
imports and fails on

- an import against the wing order: utils < model < infer < trust < data < eval < train < compress < cli, with serve
  beside them (serve imports only utils, model, infer and trust; only cli imports serve); nothing imports cli but
  llmkit/__main__.py; the root (llmkit/__init__.py, llmkit/__main__.py) sits above every wing, and
  llmkit/__init__.py imports no wing at import time;
- a module over 600 lines;
- a cli command module importing another command module or the cli package (cli's shared modules are flags.py,
  common.py and checks.py);
- a recipe (train/{pretrain,finetune,federated}.py, compress/{prune,distill}.py) importing another recipe.

An import is any `import llmkit...`, `from llmkit... import ...` or relative import at any depth (inside functions,
classes, `if TYPE_CHECKING:` included), a module name given as a string to importlib.import_module, __import__ or
runpy.run_module, to `-m` in an argument list (`python -m llmkit` runs llmkit/__main__.py), or imported by a `-c`
code string in an argument list. Strings are followed through names bound in the same or an enclosing scope
(`code = "..."`, `for module in COMMAND_MODULES`). There is no list of exceptions: a rule that does not fit the code
is changed here and in the architecture page, with a reason.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PACKAGE = "llmkit"
ORDER = ("utils", "model", "infer", "trust", "data", "eval", "train", "compress", "cli")
SERVE = "serve"
SERVE_IMPORTS = ("utils", "model", "infer", "trust")
TOP = "root"  # llmkit/__init__.py and llmkit/__main__.py: above every wing
CLI_SHARED = ("flags", "common", "checks")
RECIPES = ("llmkit.train.pretrain", "llmkit.train.finetune", "llmkit.train.federated", "llmkit.compress.prune",
           "llmkit.compress.distill")
MAX_LINES = 600
IMPORT_CALLS = ("import_module", "__import__", "run_module")


@dataclass(frozen=True)
class Ref:
    """One module a module imports: `target` is a dotted module name, `at_import` whether the statement runs when
    the importing module is imported (not inside a function)."""
    line: int
    target: str
    how: str
    at_import: bool


@dataclass
class Module:
    name: str
    rel: str  # the path from the folder that holds the package: llmkit/model/config.py
    source: str
    refs: list[Ref]


# ---------------------------------------------------------------------------------------------------------------
# reading imports


def _module_names(package_dir: Path) -> dict[str, Path]:
    """{dotted name: file} of every module under a package folder (packages by their __init__.py)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _scopes(tree: ast.AST):
    """Every scope (the module, each function, each lambda) with the nodes it holds directly."""
    def own(node):
        for child in ast.iter_child_nodes(node):
            yield child
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from own(child)

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield node, list(own(node))


class _Reader:
    """The imports of one module's source."""

    def __init__(self, source: str, name: str, is_package: bool, known: set[str]):
        self.name, self.is_package, self.known = name, is_package, known
        self.tree = ast.parse(source)
        self.refs: list[Ref] = []
        self.parent: dict[ast.AST, ast.AST] = {}
        self.bindings: dict[ast.AST, dict[str, list[tuple[str, ast.AST]]]] = {}
        for scope, nodes in _scopes(self.tree):
            names = self.bindings.setdefault(scope, {})
            for node in nodes:
                for child in ast.iter_child_nodes(node):
                    self.parent[child] = node
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            names.setdefault(t.id, []).append(("value", node.value))
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) \
                        and node.value is not None:
                    names.setdefault(node.target.id, []).append(("value", node.value))
                elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) \
                        and isinstance(node.target, ast.Name):
                    names.setdefault(node.target.id, []).append(("element", node.iter))
            if not isinstance(scope, ast.Module):
                for child in ast.iter_child_nodes(scope):
                    self.parent[child] = scope

    # where a node is
    def _enclosing(self, node) -> list[ast.AST]:
        """The scopes around a node, innermost first."""
        out = []
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                out.append(node)
        return out + [self.tree]

    def _at_import(self, node) -> bool:
        return len(self._enclosing(node)) == 1

    # strings
    def _strings(self, expr, scopes, depth=0) -> set[str]:
        """The strings an expression may hold: constants, names bound to them, and the constant head of an
        f-string or a `+` (`f"llmkit.cli.{x}"` -> "llmkit.cli.")."""
        if depth > 8:
            return set()
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.JoinedStr) and expr.values and isinstance(expr.values[0], ast.Constant):
            return {str(expr.values[0].value)}
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return {s for s in self._strings(expr.left, scopes, depth + 1)}
        if isinstance(expr, ast.Name):
            out = set()
            for scope in scopes:
                for kind, value in self.bindings.get(scope, {}).get(expr.id, []):
                    if kind == "value":
                        out |= self._strings(value, scopes, depth + 1)
                    else:
                        for element in self._elements(value, scopes, depth + 1):
                            out |= self._strings(element, scopes, depth + 1)
                if out:
                    break
            return out
        return set()

    def _elements(self, expr, scopes, depth) -> list[ast.AST]:
        """The element expressions of a list, tuple or set literal (or of a name bound to one)."""
        if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
            return list(expr.elts)
        if isinstance(expr, ast.Name) and depth <= 8:
            for scope in scopes:
                found = [e for kind, value in self.bindings.get(scope, {}).get(expr.id, []) if kind == "value"
                         for e in self._elements(value, scopes, depth + 1)]
                if found:
                    return found
        return []

    # module names
    def _absolute(self, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def _add(self, node, target: str, how: str):
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            self.refs.append(Ref(node.lineno, target, how, self._at_import(node)))

    def _add_string(self, node, text: str, how: str):
        """A module name given as a string; a trailing dot (an f-string's head) names the package before it."""
        text = text.strip()
        if text.endswith("."):
            text = text.rstrip(".")
        if how == "-m" and text in self.known and text + ".__main__" in self.known:
            text += ".__main__"  # python -m <package> runs its __main__.py
        self._add(node, text, how)

    def read(self) -> list[Ref]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._add(node, alias.name, "import")
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(node.module, node.level)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    self._add(node, sub if sub in self.known else base, "from-import")
            elif isinstance(node, ast.Call):
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) \
                    else None
                if fname in IMPORT_CALLS and node.args:
                    for s in self._strings(node.args[0], self._enclosing(node)):
                        self._add_string(node, s, fname)
            elif isinstance(node, (ast.List, ast.Tuple)):
                self._argv(node)
        return self.refs

    def _argv(self, node):
        """`-m <module>` and `-c <code>` in an argument list."""
        elts = node.elts
        for flag, value in zip(elts, elts[1:]):
            if not (isinstance(flag, ast.Constant) and flag.value in ("-m", "-c")):
                continue
            for s in self._strings(value, self._enclosing(node)):
                if flag.value == "-m":
                    self._add_string(value, s, "-m")
                    continue
                try:
                    inner = _Reader(s, "__main__", False, self.known).read()
                except SyntaxError:
                    continue
                for ref in inner:
                    self.refs.append(Ref(value.lineno, ref.target, "-c", self._at_import(node)))


def read_package(package_dir: Path) -> list[Module]:
    """Every module of a package folder with the llmkit modules it imports."""
    names = _module_names(package_dir)
    known = set(names)
    out = []
    for name, path in names.items():
        source = path.read_text(encoding="utf-8")
        refs = _Reader(source, name, path.name == "__init__.py", known).read()
        out.append(Module(name, path.relative_to(package_dir.parent).as_posix(), source, refs))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the rules


def wing_of(name: str) -> str | None:
    """The wing a dotted module name lives in: a name in ORDER, "serve", TOP for the root, None for none."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1 or parts[1] in ("__main__", "__init__"):
        return TOP
    return parts[1] if parts[1] in ORDER or parts[1] == SERVE else None


def _may_import(src: Module, wing: str, target_wing: str) -> str | None:
    """None when the wing order allows the import, else why not."""
    if target_wing == wing and wing != TOP:
        return None
    if wing == TOP:
        if target_wing == TOP:
            return None
        if target_wing == "cli" and src.name != f"{PACKAGE}.__main__":
            return "only llmkit/__main__.py imports cli"
        if target_wing == SERVE:
            return "only cli imports serve"
        return None
    if target_wing == TOP:
        return "the root package sits above every wing: a wing imports only wings"
    if target_wing == "cli":
        return "nothing imports cli but llmkit/__main__.py"
    if target_wing == SERVE:
        return None if wing == "cli" else "only cli imports serve"
    if wing == SERVE:
        return None if target_wing in SERVE_IMPORTS else f"serve imports only {', '.join(SERVE_IMPORTS)}"
    if ORDER.index(target_wing) < ORDER.index(wing):
        return None
    return f"{wing} imports only wings to its left ({', '.join(ORDER[:ORDER.index(wing)]) or 'none'})"


def _where(module: Module, ref: Ref) -> str:
    how = {"from-import": "", "import": ""}.get(ref.how, f" (as a string given to {ref.how})")
    return f"{module.rel}:{ref.line}: imports {ref.target}{how}"


def layer_problems(modules: list[Module]) -> list[str]:
    problems = []
    for m in modules:
        wing = wing_of(m.name)
        if wing is None:
            problems.append(f"{m.rel}:1: a module outside every wing ({', '.join(ORDER)}, {SERVE})")
            continue
        for ref in m.refs:
            target_wing = wing_of(ref.target)
            if target_wing is None:
                why = "a module in no wing (an old flat path? import its new one)"
            elif m.name == PACKAGE and ref.at_import and target_wing != TOP:
                why = "`import llmkit` imports no wing: import it inside a function"
            else:
                why = _may_import(m, wing, target_wing)
            if why:
                problems.append(f"{_where(m, ref)} [{wing} -> {target_wing or '?'}]: {why}")
    return sorted(set(problems), key=_key)


def size_problems(modules: list[Module], limit: int = MAX_LINES) -> list[str]:
    return sorted((f"{m.rel}:{limit + 1}: {len(m.source.splitlines())} lines, over the limit of {limit}: split it"
                   for m in modules if len(m.source.splitlines()) > limit), key=_key)


def _owner(target: str, known: set[str]) -> str:
    """The longest known module a dotted name starts with (`llmkit.cli.flags.X` -> `llmkit.cli.flags`)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return target


def _command(name: str) -> str | None:
    """The command group of a cli module (`llmkit.cli.train` -> "train"), None for the package and shared ones."""
    parts = name.split(".")
    if parts[:2] != [PACKAGE, "cli"] or len(parts) < 3 or parts[2] in CLI_SHARED or parts[2] == "__main__":
        return None
    return parts[2]


def command_problems(modules: list[Module]) -> list[str]:
    known = {m.name for m in modules}
    cli = f"{PACKAGE}.cli"
    problems = []
    for m in modules:
        mine = _command(m.name)
        if mine is None:
            continue
        for ref in m.refs:
            target = _owner(ref.target, known)
            if target == cli:
                problems.append(f"{_where(m, ref)}: a command module imports the library and cli's "
                                f"{', '.join(CLI_SHARED)}, not the cli package (llmkit/cli/__init__.py)")
            elif _command(target) not in (None, mine):
                problems.append(f"{_where(m, ref)}: a command module imports no other command module (move what "
                                f"both need into cli/{', cli/'.join(CLI_SHARED)} or the library)")
    return sorted(set(problems), key=_key)


def recipe_problems(modules: list[Module]) -> list[str]:
    known = {m.name for m in modules}
    problems = []
    for m in modules:
        if m.name not in RECIPES:
            continue
        for ref in m.refs:
            target = _owner(ref.target, known)
            if target in RECIPES and target != m.name:
                problems.append(f"{_where(m, ref)}: a recipe imports components, never another recipe (move what "
                                f"both need into a lower module: the loop, losses, data.sft, infer.classify, ...)")
    return sorted(set(problems), key=_key)


def _key(problem: str):
    path, line, _ = problem.split(":", 2)
    return path, int(line), problem


def _report(problems: list[str], rule: str) -> str:
    return f"{len(problems)} import(s) against the rule '{rule}' (docs/dev/architecture.md):\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# the tests on llmkit/


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    return read_package(ROOT / PACKAGE)


def test_the_pass_reads_the_package(modules):
    """Not vacuous: every wing has modules, and the pass sees imports inside functions and importlib strings."""
    wings = {wing_of(m.name) for m in modules}
    assert set(ORDER) | {SERVE, TOP} <= wings, sorted(w for w in wings if w)
    refs = [r for m in modules for r in m.refs]
    assert len(refs) > 200
    assert any(not r.at_import for r in refs), "no function-local import found"


def test_imports_follow_the_wing_order(modules):
    problems = layer_problems(modules)
    assert not problems, _report(problems, "a wing imports only itself and wings to its left; serve only utils, "
                                           "model, infer, trust; only cli imports serve; only __main__ imports cli")


def test_modules_stay_under_600_lines(modules):
    problems = size_problems(modules)
    assert not problems, f"{len(problems)} module(s) over {MAX_LINES} lines:\n" + "\n".join(problems)


def test_command_modules_import_no_other_command(modules):
    problems = command_problems(modules)
    assert not problems, _report(problems, "a cli command module imports the library and cli's flags, common, "
                                           "checks; never another command module or the cli package")


def test_recipes_import_no_other_recipe(modules):
    problems = recipe_problems(modules)
    assert not problems, _report(problems, "recipes import components, never each other")


# ---------------------------------------------------------------------------------------------------------------
# the checker on small synthetic packages


def _package(tmp_path: Path, files: dict[str, str]) -> list[Module]:
    for rel, text in {"llmkit/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            if parent.parts and not (tmp_path / parent / "__init__.py").exists():
                (tmp_path / parent / "__init__.py").write_text("")
        path.write_text(text)
    return read_package(tmp_path / "llmkit")


def test_checker_catches_an_upward_import_inside_a_function(tmp_path):
    mods = _package(tmp_path, {
        "llmkit/model/a.py": "import os\n\n\ndef f():\n    if os.sep:\n        from llmkit.train.loop import x\n",
        "llmkit/train/loop.py": "x = 1\n",
    })
    assert layer_problems(mods) == ["llmkit/model/a.py:6: imports llmkit.train.loop [model -> train]: model imports "
                                    "only wings to its left (utils)"]


def test_checker_catches_a_string_given_to_importlib(tmp_path):
    mods = _package(tmp_path, {
        "llmkit/infer/a.py": "import importlib\n\n\ndef f():\n    return importlib.import_module('llmkit.cli.gen')\n",
        "llmkit/eval/b.py": "import importlib\nMODS = ['llmkit.train.loop']\n\n\ndef g():\n"
                            "    for m in MODS:\n        importlib.import_module(m)\n",
        "llmkit/cli/gen.py": "",
        "llmkit/train/loop.py": "",
    })
    assert layer_problems(mods) == [
        "llmkit/eval/b.py:7: imports llmkit.train.loop (as a string given to import_module) [eval -> train]: eval "
        "imports only wings to its left (utils, model, infer, trust, data)",
        "llmkit/infer/a.py:5: imports llmkit.cli.gen (as a string given to import_module) [infer -> cli]: nothing "
        "imports cli but llmkit/__main__.py",
    ]


def test_checker_reads_argument_lists_and_relative_imports(tmp_path):
    mods = _package(tmp_path, {
        "llmkit/__main__.py": "from llmkit.cli import main\n",
        "llmkit/utils/a.py": "import sys\n\n\ndef f():\n    code = ('import json; '\n            'from llmkit.eval.x "
                             "import y')\n    return [sys.executable, '-c', code], [sys.executable, '-m', 'llmkit']\n",
        "llmkit/serve/b.py": "from ..data import c\nfrom . import d\n",
        "llmkit/serve/d.py": "",
        "llmkit/data/c.py": "",
        "llmkit/eval/x.py": "",
        "llmkit/cli/__init__.py": "def main():\n    pass\n",
    })
    assert layer_problems(mods) == [
        "llmkit/serve/b.py:1: imports llmkit.data.c [serve -> data]: serve imports only utils, model, infer, trust",
        "llmkit/utils/a.py:7: imports llmkit.__main__ (as a string given to -m) [utils -> root]: the root package "
        "sits above every wing: a wing imports only wings",
        "llmkit/utils/a.py:7: imports llmkit.eval.x (as a string given to -c) [utils -> eval]: utils imports only "
        "wings to its left (none)",
    ]


def test_checker_root_rules(tmp_path):
    mods = _package(tmp_path, {
        "llmkit/__init__.py": "from llmkit.utils import a\n\n\ndef f():\n    import llmkit.model.m\n"
                              "    import llmkit.cli\n",
        "llmkit/__main__.py": "from llmkit.cli import main\n",
        "llmkit/utils/a.py": "",
        "llmkit/model/m.py": "from llmkit import __version__\n",
        "llmkit/cli/__init__.py": "def main():\n    pass\n",
    })
    assert layer_problems(mods) == [
        "llmkit/__init__.py:1: imports llmkit.utils.a [root -> utils]: `import llmkit` imports no wing: import it "
        "inside a function",
        "llmkit/__init__.py:6: imports llmkit.cli [root -> cli]: only llmkit/__main__.py imports cli",
        "llmkit/model/m.py:1: imports llmkit [model -> root]: the root package sits above every wing: a wing imports "
        "only wings",
    ]


def test_checker_commands_recipes_and_sizes(tmp_path):
    mods = _package(tmp_path, {
        "llmkit/cli/__init__.py": "from llmkit.cli import gen, train\n",
        "llmkit/cli/flags.py": "",
        "llmkit/cli/gen.py": "from llmkit.cli import flags\nfrom llmkit.cli.train import x\nfrom llmkit import cli\n",
        "llmkit/cli/train.py": "x = 1\n",
        "llmkit/train/finetune.py": "def f():\n    from llmkit.train.pretrain import clm_loss\n",
        "llmkit/train/pretrain.py": "clm_loss = 1\n" + "\n" * 600,
    })
    assert command_problems(mods) == [
        "llmkit/cli/gen.py:2: imports llmkit.cli.train: a command module imports no other command module (move what "
        "both need into cli/flags, cli/common, cli/checks or the library)",
        "llmkit/cli/gen.py:3: imports llmkit.cli: a command module imports the library and cli's flags, common, "
        "checks, not the cli package (llmkit/cli/__init__.py)",
    ]
    assert recipe_problems(mods) == [
        "llmkit/train/finetune.py:2: imports llmkit.train.pretrain: a recipe imports components, never another recipe "
        "(move what both need into a lower module: the loop, losses, data.sft, infer.classify, ...)"]
    assert size_problems(mods) == ["llmkit/train/pretrain.py:601: 601 lines, over the limit of 600: split it"]
