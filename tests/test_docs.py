"""The docs cannot drift from the code: every `llmkit ...` command in README.md and docs/ parses with the real parser,
every relative link resolves, docs/cli.md is what docs/gen_cli.py writes today, and (where mkdocs is installed) the
site builds with --strict. Fast: nothing is run, only parsed."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {"|", "||", "&&", ";", "&"}


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _code_lines(text: str):
    """(line number, line) of every line inside a shell-like fenced code block, backslash continuations joined."""
    lang, fence, start, buf = None, None, 0, ""
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, lang = m.group(2), m.group(3).lower()
            continue
        if m and m.group(2).startswith(fence) and not m.group(3):
            fence, lang = None, None
            continue
        if lang not in SHELL_LANGS:
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
        elif fence is not None and m and m.group(2).startswith(fence) and not m.group(3):
            fence = None
        elif fence is None:
            out.append(line)
    return "\n".join(out)


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line.strip(), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _llmkit_argv(words: list[str]) -> list[str] | None:
    """The arguments after `llmkit` in one simple command (env assignments, `$ `, `python -m llmkit`,
    `.venv/bin/llmkit`, `torchrun ... -m llmkit` allowed), or None when the command is not llmkit."""
    while words and (words[0] == "$" or ENV.match(words[0])):
        words = words[1:]
    if not words:
        return None
    if words[0] == "llmkit" or words[0].endswith("/llmkit"):
        return words[1:]
    if words[0] in ("python", "python3", "torchrun") or words[0].endswith(("/python", "/python3")):
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "llmkit":
                return words[i + 2:]
    return None


def _commands(line: str) -> list[list[str]]:
    """Every llmkit command of a shell line (split at pipes, &&, ; and &; redirections dropped)."""
    try:
        toks = _tokens(line)
    except ValueError:  # an unbalanced quote: not a command line we can judge
        return []
    out, cur = [], []
    for t in [*toks, ";"]:
        if t in OPERATORS:
            argv = _llmkit_argv(cur)
            if argv is not None:
                out.append(argv)
            cur = []
        else:
            cur.append(t)
    for argv in out:  # `> file`, `< file`, `2>&1`
        i = 0
        while i < len(argv):
            if argv[i] in (">", ">>", "<") or re.fullmatch(r"\d?>>?(&\d)?", argv[i]):
                del argv[i:i + (1 if "&" in argv[i] else 2)]
            else:
                i += 1
    return out


def _doc_commands():
    for page in PAGES:
        for n, line in _code_lines(page.read_text(encoding="utf-8")):
            for argv in _commands(line):
                yield pytest.param(argv, id=f"{_rel(page)}:{n}")


@pytest.fixture(scope="module")
def parser():
    from llmkit.cli import build_parser

    return build_parser()


def _parse(parser, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):  # --help and --version exit 0
                return err.getvalue().strip() or f"exit {e.code}"
    return None


COMMANDS = list(_doc_commands())


def test_docs_show_commands():
    assert len(COMMANDS) > 50, "the command extraction found almost nothing: is the fence parsing broken?"


@pytest.mark.parametrize("argv", COMMANDS)
def test_documented_command_parses(parser, argv):
    problem = _parse(parser, argv)
    assert problem is None, f"`llmkit {shlex.join(argv)}` does not parse: {problem}"


INLINE = re.compile(r"`((?:llmkit|python -m llmkit) [^`]+)`")


def _subparser(parser, words):
    """(the subparser reached by the leading command words, the remaining words)."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


def test_inline_commands_name_real_commands_and_flags(parser):
    """`llmkit ...` code spans in prose are often fragments (`llmkit finetune ... --dp-epsilon 8`): their command words
    must name a command and their --flags must be that command's."""
    problems = []
    for page in PAGES:
        for span in INLINE.findall(_prose(page.read_text(encoding="utf-8"))):
            try:
                words = shlex.split(span.replace("...", " "))
            except ValueError:
                words = span.replace("...", " ").split()
            words = words[3:] if words[:3] == ["python", "-m", "llmkit"] else words[1:]
            if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                continue  # `llmkit <command>`, `llmkit ...`
            sub, rest = _subparser(parser, words)
            if sub is parser:
                problems.append(f"{_rel(page)}: `{span}`: no command {words[0]!r}")
                continue
            if sub.prefix_chars != "-":  # lm-eval passes everything through
                continue
            for w in rest:
                flag = w.split("=", 1)[0]
                if flag.startswith("--") and flag != "--" and flag not in sub._option_string_actions:
                    problems.append(f"{_rel(page)}: `{span}`: {sub.prog} has no {flag}")
    assert not problems, "\n".join(problems)


LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?")
REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def _links(text: str):
    prose = re.sub(r"`[^`\n]*`", "", _prose(text))  # links inside code are not links
    yield from LINK.findall(prose)
    yield from IMAGE.findall(prose)
    yield from REF_DEF.findall(prose)


def _slug(heading: str) -> str:
    """The id GitHub and mkdocs' toc give a heading (lowercase, punctuation dropped, spaces to dashes)."""
    h = re.sub(r"<[^>]+>", "", heading).strip().lower()
    h = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", h)
    h = re.sub(r"[^\w\- ]", "", h)
    return re.sub(r"[\s]+", "-", h)


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(page.read_text("utf-8")), re.M)}


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        for target in _links(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{_rel(page)}: [{target}] -> {path} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{_rel(page)}: [{target}] -> no heading #{anchor} in {_rel(dest)}")
    assert not problems, "\n".join(problems)


def test_cli_reference_is_current():
    r = subprocess.run([sys.executable, str(DOCS / "gen_cli.py"), "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr + "\nrun `python docs/gen_cli.py` to regenerate docs/cli.md"


def test_mkdocs_nav_lists_every_page():
    """Every page under docs/ is in mkdocs.yml's nav (mkdocs only warns, and only at INFO level, about the others)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.M))
    pages = {_rel(p)[len("docs/"):] for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert listed - pages == set(), f"nav entries without a page: {sorted(listed - pages)}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs-material is not installed (pip install mkdocs-material): the strict site build "
                    "is skipped")
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# module paths named in the docs (checked once the code lives in its wings: llmkit/utils/ exists)

WINGS = (ROOT / "llmkit" / "utils").is_dir()
NOT_YET = "the docs name the wings' module paths (llmkit/model/..., llmkit.infer....); the code is not in wings yet"
DOTTED = re.compile(r"(?<![\w/.-])llmkit((?:\.[A-Za-z_]\w*)+)")
PATHS = re.compile(r"(?<![\w/.-])llmkit/([\w./-]*)")


def _defined(path: Path, name: str, top: bool) -> bool:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name.split(".")[0]) == name
                                                                    for a in node.names):
            return True
    return False


def _resolve_dotted(parts: list[str]) -> str | None:
    """None if llmkit.<parts> names a module, or a name defined in one; else what is missing."""
    for i in range(len(parts), 0, -1):
        base = ROOT / "llmkit" / Path(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[i:]
            if not rest:
                return None
            if not _defined(module, rest[0], top=True):
                return f"{_rel(module)} defines no {rest[0]}"
            if len(rest) > 1 and not _defined(module, rest[1], top=False):
                return f"{_rel(module)} defines no {rest[1]}"
            return None
    return f"no module llmkit/{'/'.join(parts)}"


@pytest.mark.skipif(not WINGS, reason=NOT_YET)
def test_module_paths_in_docs_exist():
    problems = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in PATHS.finditer(text):
            rel = m.group(1).rstrip(".")
            if rel and not (ROOT / "llmkit" / rel).exists():
                problems.append(f"{_rel(page)}: llmkit/{rel} does not exist")
        for m in DOTTED.finditer(text):
            parts = m.group(1).lstrip(".").split(".")
            if parts[-1] in ("py", "jsonl"):
                continue
            missing = _resolve_dotted(parts)
            if missing:
                problems.append(f"{_rel(page)}: llmkit.{'.'.join(parts)}: {missing}")
    assert not problems, "\n".join(problems)


def _tree() -> list[str]:
    """The paths the README's annotated tree lists (between <!-- tree --> and <!-- /tree -->), one per line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- tree -->", 1)[1].split("<!-- /tree -->", 1)[0]
    paths, stack = [], []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("```"):
            continue
        indent = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = stack[:indent] + [name.rstrip("/")]
        paths.append("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def test_readme_tree_is_marked_and_parses():
    paths = _tree()
    assert paths and paths[0] == "llmkit/", paths[:3]


@pytest.mark.skipif(not WINGS, reason=NOT_YET)
def test_readme_tree_lists_every_module():
    listed = set(_tree())
    missing = [p for p in listed if not (ROOT / p).exists()]
    assert not missing, f"the README's tree lists files that do not exist: {sorted(missing)}"
    files = {_rel(p) for p in (ROOT / "llmkit").rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix in (".py", ".jsonl") and "web" not in p.relative_to(ROOT / "llmkit").parts[:1]}
    assert files - listed == set(), f"modules missing from the README's tree: {sorted(files - listed)}"


REPO_PATHS = re.compile(r"(?<![\w/.-])((?:examples|benchmarks|tests)/[\w./-]*)")


def test_repository_paths_in_docs_exist():
    """examples/, benchmarks/ and tests/ paths the docs name exist (test modules once the tests mirror the wings)."""
    problems = []
    for page in PAGES:
        for m in REPO_PATHS.finditer(page.read_text(encoding="utf-8")):
            rel = m.group(1).rstrip(".")
            if rel.startswith("tests/test_") and not WINGS:
                continue
            if not (ROOT / rel).exists():
                problems.append(f"{_rel(page)}: {rel} does not exist")
    assert not problems, "\n".join(problems)
