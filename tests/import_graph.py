"""The project's import graph, read from the source (nothing is imported): which module
imports which, at the top or inside a function, and which third-party packages each one
loads when imported (transitively, through top-level imports only)."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("builder", "evaluators", "publish")
# What a function-local import may keep out of a module that does not already load it:
# each costs seconds or hundreds of MB at import.
HEAVY = {"torch", "transformers", "vllm", "lm_eval", "ray", "safetensors", "datasets", "matplotlib",
         "accelerate", "gguf", "huggingface_hub", "pyarrow"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a project module, or the dotted name of a third-party one
    line: int
    local: bool  # inside a function
    type_only: bool  # under `if TYPE_CHECKING:`


@dataclass
class ImportGraph:
    files: dict[str, Path] = field(default_factory=dict)  # module -> file
    imports: list[Import] = field(default_factory=list)
    _heavy: dict[str, set[str]] = field(default_factory=dict, repr=False)  # heavy_packages' answers

    @classmethod
    def read(cls) -> "ImportGraph":
        graph = cls()
        for package in PACKAGES:
            for path in sorted((ROOT / package).rglob("*.py")):
                graph.files[_module_name(path)] = path
        for module, path in graph.files.items():
            graph.imports += _imports_of(module, path, graph.files)
        return graph

    def edges(self) -> dict[str, set[str]]:
        """Every import between project modules, local and type-only ones included."""
        edges: dict[str, set[str]] = {module: set() for module in self.files}
        for item in self.imports:
            if item.target in self.files and item.target != item.importer:
                edges[item.importer].add(item.target)
        return edges

    def heavy_packages(self, module: str) -> set[str]:
        """The heavy packages importing `module` loads (through top-level imports), each
        module's answer computed once: the top-level imports have no cycles (test_house)."""
        if module not in self._heavy:
            self._heavy[module] = set()  # a cycle, were there one, ends here instead of recursing
            found: set[str] = set()
            for item in self.imports:
                if item.importer != module or item.local or item.type_only:
                    continue
                root = item.target.split(".")[0]
                if root in HEAVY:
                    found.add(root)
                elif item.target in self.files:
                    found |= self.heavy_packages(item.target)
            self._heavy[module] = found
        return self._heavy[module]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(module: str, path: Path, files: dict[str, Path]) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            in_function = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            for target in _targets(child, package, files):
                found.append(Import(module, target, child.lineno, in_function, guarded))
            visit(child, in_function, guarded)

    visit(ast.parse(path.read_text()), False, False)
    return found


def _targets(node: ast.AST, package: str, files: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the package, `level - 1` folders up
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    # `from builder.stages import distill` names the module builder.stages.distill
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
