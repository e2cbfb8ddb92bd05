"""The code's shape, checked: the ML core (``opd``) never imports the operations side (``opd_ops``),
``flows/``, ``tasks/`` or Prefect; no import cycle anywhere in the project; the update path imports
without pydantic (the GPU image has none). Imports inside functions count too: they run as well."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("opd", "opd_ops", "tasks", "flows")
CORE_MUST_NOT_IMPORT = ("prefect", "flows", "tasks", "opd_ops")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out[name] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` yields a and a.b)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


MODULES = _modules()
IMPORTS = {n: _imports(n, p) for n, p in MODULES.items()}


def _project_edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (an imported name resolves to its module)."""
    def resolve(name):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    return {n: {m for m in map(resolve, imps) if m and m != n} for n, imps in IMPORTS.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_project():
    assert {"opd.rounds", "opd.step", "opd.learner", "opd_ops.cli", "tasks.stages", "flows.distill"} <= MODULES.keys()
    assert "opd.rounds" in _project_edges()["tasks.stages"]  # the walk finds real edges


def test_core_never_imports_operations_flows_tasks_or_prefect():
    bad = sorted(f"{n} imports {i}" for n, imps in IMPORTS.items() if n == "opd" or n.startswith("opd.")
                 for i in imps if i.split(".")[0] in CORE_MUST_NOT_IMPORT)
    assert not bad, "the ML core must stay framework-free:\n" + "\n".join(bad)


def test_no_import_cycles():
    assert _cycles(_project_edges()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_update_path_imports_without_pydantic_vllm_or_prefect():
    """What benchmarks/gpu_update.py needs on a bare GPU image (torch, transformers, accelerate, peft)."""
    blocked = ["pydantic", "vllm", "prefect", "great_expectations", "datasets", "boto3"]
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
            + "import opd.learner, opd.objectives, opd.trainer, opd.checkpoints, opd.lm_head, opd.memory\n"
              "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
