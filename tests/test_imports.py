"""The package's import graph: no module imports another that imports it back, lazily or not."""

import ast
from pathlib import Path

import polca_lightning

PACKAGE = Path(polca_lightning.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("polca_lightning",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its code (function bodies too).

    ``from package import name`` counts as importing ``package.name`` when that is a module.
    A module's own ancestor packages are left out: Python initialises them before any of
    their modules, so they close no loop of their own.
    """
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] if node.level else [])
                module = ".".join(p for p in (base, node.module or "") if p) if node.level else node.module
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in ancestors:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert "polca_lightning.store.schema" in graph["polca_lightning.store.reader"]  # the walk sees imports
    assert "polca_lightning.report.tables" in graph["polca_lightning.report.figures"]  # lazy ones too
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_reader_and_writer_import_the_schema_never_each_other():
    graph = import_graph()
    assert "polca_lightning.store.writer" not in graph["polca_lightning.store.reader"]
    assert "polca_lightning.store.reader" not in graph["polca_lightning.store.writer"]


def test_info_lines_reach_stderr_once_whether_or_not_the_application_configured_logging():
    import subprocess
    import sys

    say = "import logging; logging.getLogger('polca_lightning.tracker').info('POLCA: basis step at 40')"
    # and Lightning (seconds to import, torch.compile's machinery with it) waits for the callback:
    # the command line, the plain loop, the checkpoint series and a reader of stores go without
    heavy = "('lightning', 'torchmetrics', 'torch._dynamo')"
    bare = subprocess.run(
        [sys.executable, "-c", "import sys, polca_lightning, polca_lightning.cli, polca_lightning.loop, "
                               "polca_lightning.series, polca_lightning.report; "
                               f"print([m for m in {heavy} if m in sys.modules]); {say}; "
                               f"polca_lightning.POLCACallback; print([m for m in {heavy} if m in sys.modules])"],
        capture_output=True, text=True, check=True)
    assert bare.stderr.count("POLCA: basis step at 40") == 1
    assert bare.stdout.splitlines() == ["[]", "['lightning', 'torchmetrics', 'torch._dynamo']"]
    configured = subprocess.run(
        [sys.executable, "-c", f"import logging; logging.basicConfig(format='app %(message)s'); "
                               f"import polca_lightning; {say}"], capture_output=True, text=True, check=True)
    assert configured.stderr.count("POLCA: basis step at 40") == 1 and "app POLCA" in configured.stderr


def test_the_torch_math_imports_nothing_else_of_the_package():
    graph = import_graph()
    core = [m for m in graph if m.startswith("polca_lightning.core.")]
    assert "polca_lightning.core.engine" in core and "polca_lightning.core.hessian" in core
    for module in core:
        assert all(d.startswith("polca_lightning.core") for d in graph[module]), (module, graph[module])


def external_imports(module: str) -> set[str]:
    """The top-level names of the packages outside polca_lightning that ``module`` imports anywhere."""
    path = _modules()[module]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
    return out - {"polca_lightning"}


def dependencies(graph: dict[str, set[str]], module: str) -> set[str]:
    """``module`` and every package module it imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_one_session_under_two_loops_that_do_not_know_each_other():
    graph = import_graph()
    assert "lightning" in external_imports("polca_lightning.callback")  # the walk sees third-party imports
    assert "transformers" in external_imports("polca_lightning.hf")
    below = dependencies(graph, "polca_lightning.session")
    assert {"polca_lightning.tracker", "polca_lightning.store.writer", "polca_lightning.report.pipeline"} <= below
    for module in below:
        assert not external_imports(module) & {"lightning", "pytorch_lightning", "transformers", "accelerate"}, module
    assert "polca_lightning.session" in graph["polca_lightning.callback"] and "polca_lightning.session" in graph["polca_lightning.hf"]
    assert "polca_lightning.hf" not in dependencies(graph, "polca_lightning.callback")
    assert "polca_lightning.callback" not in dependencies(graph, "polca_lightning.hf")


#: run first in a subprocess: ``transformers`` and ``accelerate`` look uninstalled (no module,
#: no distribution metadata), as in an environment without the extra
_WITHOUT_THE_EXTRA = """
import importlib.metadata as md, sys
hidden = ("transformers", "accelerate")
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
def hide(real):
    def lookup(name):
        if name in hidden:
            raise md.PackageNotFoundError(name)
        return real(name)
    return lookup
md.version, md.distribution = hide(md.version), hide(md.distribution)
"""


def test_the_package_needs_transformers_only_for_the_hugging_face_callback():
    import subprocess
    import sys

    graph = import_graph()
    users = {m for m in graph if "transformers" in external_imports(m) or "accelerate" in external_imports(m)}
    assert users == {"polca_lightning.hf"}
    # without the extra: the package imports (and leaves transformers unimported); the callback
    # of polca_lightning.hf says which extra to install. (With transformers installed, Lightning's
    # torchmetrics imports it on its own.)
    code = _WITHOUT_THE_EXTRA + (
        "import polca_lightning, polca_lightning.report, polca_lightning.session\n"
        "print(sorted(m for m in hidden if m in sys.modules))\n"
        "try:\n    import polca_lightning.hf\nexcept ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "[]", 'polca_lightning.hf needs transformers (and accelerate): pip install "polca-lightning[transformers]"']


def test_the_top_level_holds_the_callbacks_the_config_the_settings_the_session_and_the_subpackages():
    import importlib

    import pytest

    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top == {"__init__", "__main__", "_docs", "ablation", "callback", "checkpoints", "cli", "config", "data", "hf",
                   "lca", "loop", "series", "session", "settings", "time_left", "toy", "tracker", "analysis", "core", "report",
                   "store"}
    for old in ("engine", "losses", "functional", "hessian", "polca", "_moved"):  # now only under core/
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"polca_lightning.{old}")
