"""The import rules of docs/architecture.md, checked on the source with `ast` (nothing is imported).

Every `import` statement counts: at module level, inside functions, and under `if TYPE_CHECKING:`
(a cycle or a forbidden dependency that only types see is still one in the design; the cure is a
Protocol in the lower module, not hiding the import). An edge goes to the module an import names
(`from a.b import c` names `a.b.c` when that is a module, else `a.b`); the parent packages Python also
executes on the way are not edges, since every `__init__.py` here is empty.

The doc lists the rules as "- `rule-id`: ..."; `test_the_doc_lists_exactly_the_enforced_rules` keeps
that list and the `@rule` tests below the same. The same file checks that paths the code and docs cite
(`docs/proxy.md`, `controller/jobs/ledger.py`, `python -m tests.update_readme`) exist, so comments stay
true when files move.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.support import ROOT

PACKAGE = "ollama_fleet"
OLD_TOP_LEVEL = frozenset({"fleet", "controller", "agent", "broker", "web"})  # before the one namespace
DOC = ROOT / "docs" / "architecture.md"
RULES: dict[str, Callable[[], None]] = {}


def rule(rule_id: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register a test as the enforcement of the doc's rule `rule_id`."""
    def register(test: Callable[[], None]) -> Callable[[], None]:
        RULES[rule_id] = test
        return test
    return register


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # module named by the statement (absolute; relative ones resolved)
    line: int
    level: int  # > 0 for a relative import

    def __str__(self) -> str:
        return f"{_path_of(self.source)}:{self.line}: {self.source} -> {self.target}"


def _walk(top: Path) -> Iterator[Path]:
    """Every .py under `top`, through the ollama_fleet/<name> symlinks (os.walk does not follow them
    unless asked, and pathlib's rglob does not before Python 3.13)."""
    for folder, dirs, files in os.walk(top, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        yield from (Path(folder) / f for f in sorted(files) if f.endswith(".py"))


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Our modules by dotted name (`ollama_fleet.controller.registry.live`)."""
    return {_module_name(p, ROOT): p for p in _walk(ROOT / PACKAGE)}


@cache
def _test_modules() -> dict[str, Path]:
    return {_module_name(p, ROOT): p for p in _walk(ROOT / "tests")}


def _path_of(module: str) -> str:
    path = {**_modules(), **_test_modules()}[module]
    return str(path.relative_to(ROOT))


def _resolve(name: str) -> str:
    """The longest prefix of `name` that is one of our modules (`pkg.mod.attr` -> `pkg.mod`)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in _modules():
        parts.pop()
    return ".".join(parts) or name


def _imports_of(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, 0)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # resolve against the importing package, only to report and graph it
                package = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                yield Import(module, child if child in _modules() else base, node.lineno, node.level)


@cache
def _all_imports() -> tuple[Import, ...]:
    return tuple(i for m, p in sorted({**_modules(), **_test_modules()}.items()) for i in _imports_of(m, p))


@cache
def _graph() -> dict[str, list[Import]]:
    """Edges between our own modules."""
    graph: dict[str, list[Import]] = {m: [] for m in _modules()}
    for imp in _all_imports():
        if imp.source in _modules() and _within(imp.target, PACKAGE):
            graph[imp.source].append(Import(imp.source, _resolve(imp.target), imp.line, imp.level))
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _crossing(source_pkg: str, target_pkg: str) -> list[str]:
    return [str(i) for edges in _graph().values() for i in edges
            if _within(i.source, source_pkg) and _within(i.target, target_pkg)]


def _strongly_connected(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in graph[v]:
            w = edge.target
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(e.target == v for e in graph[v]):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph: dict[str, list[Import]], members: list[str]) -> list[Import]:
    """A shortest cycle through the first member, inside its component: the edges to read first."""
    inside, start = set(members), members[0]
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for edge in graph[v]:
            if edge.target == start:
                return [*paths[v], edge]
            if edge.target in inside and edge.target not in paths:
                paths[edge.target] = [*paths[v], edge]
                queue.append(edge.target)
    return []


@rule("no-cycles")
def test_no_import_cycles() -> None:
    graph = _graph()
    report = []
    for members in _strongly_connected(graph):
        cycle = "\n    ".join(str(e) for e in _one_cycle(graph, members))
        report.append(f"{', '.join(members)}\n  e.g.\n    {cycle}")
    assert not report, "import cycles:\n" + "\n".join(report)


@rule("controller-agent-apart")
def test_controller_and_agent_never_import_each_other() -> None:
    crossing = (_crossing(f"{PACKAGE}.controller", f"{PACKAGE}.agent")
                + _crossing(f"{PACKAGE}.agent", f"{PACKAGE}.controller"))
    assert not crossing, ("controller <-> agent imports (compose them in ollama_fleet.launcher):\n"
                          + "\n".join(crossing))


@rule("contract-self-contained")
def test_contract_imports_nothing_of_ours_outside_itself() -> None:
    contract = f"{PACKAGE}.contract"
    leaks = [str(i) for edges in _graph().values() for i in edges
             if _within(i.source, contract) and not _within(i.target, contract)]
    assert not leaks, "the contract imports our other code:\n" + "\n".join(leaks)


def _old_module_strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Module names in code that are imported or run by name: `python -m <module>` in a string or an
    argument list, and `importlib.import_module("<module>")`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for m in re.finditer(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)", node.value):
                yield node.lineno, m.group(1)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for flag, arg in zip(node.elts, node.elts[1:]):
                if (isinstance(flag, ast.Constant) and flag.value == "-m"
                        and isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    yield arg.lineno, arg.value
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = (func.attr if isinstance(func, ast.Attribute)
                    else func.id if isinstance(func, ast.Name) else "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


@rule("absolute-namespace")
def test_imports_are_absolute_and_in_the_one_namespace() -> None:
    bad = [f"{i}  (relative)" for i in _all_imports() if i.level]
    bad += [f"{i}  (old top-level name)" for i in _all_imports()
            if not i.level and i.target.split(".")[0] in OLD_TOP_LEVEL]
    for module, path in sorted({**_modules(), **_test_modules()}.items()):
        for line, name in _old_module_strings(ast.parse(path.read_text(), str(path))):
            if name.split(".")[0] in OLD_TOP_LEVEL:
                where = f"{path.relative_to(ROOT)}:{line}: {module}"
                bad.append(f"{where} names module {name!r}  (old top-level name)")
    assert not bad, "\n".join(bad)


@rule("dashboard-not-api")
def test_the_dashboard_never_imports_the_json_api() -> None:
    crossing = _crossing(f"{PACKAGE}.controller.dashboard", f"{PACKAGE}.controller.api")
    assert not crossing, ("dashboard -> api imports (share ollama_fleet.controller.readmodel):\n"
                          + "\n".join(crossing))


def test_the_doc_lists_exactly_the_enforced_rules() -> None:
    section = DOC.read_text().split("\n## Import rules", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `([a-z-]+)`", section, re.MULTILINE)
    assert sorted(listed) == sorted(RULES), f"doc lists {listed}, the test enforces {sorted(RULES)}"


def test_the_doc_names_every_module() -> None:
    """The layout table names each module (`ledger`) or package (`…controller.jobs`) in backticks."""
    layout = DOC.read_text().split("\n## Package layout", 1)[1].split("\n## ", 1)[0]
    missing = sorted(m for m in _modules() if m != PACKAGE and not m.split(".")[-1].startswith("_")
                     and f"`{m.split('.')[-1]}`" not in layout and f".{m.split('.')[-1]}`" not in layout)
    assert not missing, f"the package layout in docs/architecture.md does not name {missing}"


def test_the_rules_see_the_whole_tree() -> None:
    """The walk follows the symlinked packages and finds the imports the rules are about."""
    modules = _modules()
    for sub in ("controller.registry.live", "controller.dashboard.pages", "agent.service",
                "contract.protocol",
                "broker.local", "launcher"):
        assert f"{PACKAGE}.{sub}" in modules, sub
    compose = _graph()[f"{PACKAGE}.controller.compose"]
    assert any(_within(i.target, f"{PACKAGE}.controller.registry") for i in compose)


# --- cited paths -----------------------------------------------------------------------------------

CITED_PATH = re.compile(
    r"(?:(\]\()|(?<![\w./-]))((?:\.\./)?(?:[A-Za-z_][\w.-]*/)+[\w.-]+"
    r"\.(?:py|md|json|html|js|css|conf|acl|service|toml|yaml|yml|txt))(?![\w/])")
PYTHON_M = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")
CITING_SUFFIXES = (".py", ".md", ".toml", ".yaml", ".service", ".conf", ".acl", ".example",
                   ".html", ".js", ".css")
SKIP_DIRS = frozenset({".venv", ".git", "__pycache__", "node_modules", "artifacts", "dist", "build",
                       "vendor"})  # vendor/: minified third-party files


def _citing_files() -> Iterator[Path]:
    symlinks = {ROOT / PACKAGE / name for name in ("controller", "agent", "broker", "web")}
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs
                         if d not in SKIP_DIRS and not d.startswith(".") and here / d not in symlinks)
        yield from (here / f for f in sorted(files) if f.endswith(CITING_SUFFIXES) or f == "Dockerfile")


def _module_exists(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_cited_paths_and_modules_exist() -> None:
    """A path with a file extension (`docs/proxy.md`, `controller/jobs/ledger.py`) in any source or doc
    names a file of this repository, from its root or from the citing file's folder; so does a module
    after `python -m`. A markdown link quoted inside code (`](schemas/x.json)`) is skipped: its base is
    the document it will land in. URLs and absolute paths do not match."""
    missing = []
    for path in _citing_files():
        is_md = path.suffix == ".md"
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in CITED_PATH.finditer(line):
                link, ref = m.group(1), m.group(2)
                if link and not is_md:
                    continue
                if not ((ROOT / ref).exists() or (path.parent / ref).exists()):
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
            for m in PYTHON_M.finditer(line):
                if not _module_exists(m.group(1)):
                    missing.append(f"{path.relative_to(ROOT)}:{n}: python -m {m.group(1)}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)
