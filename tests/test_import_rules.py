"""The import arrows point one way.

Every first-party import in src/mridc is read with `ast`, including imports inside functions (a lazy import
still ships the dependency), and checked against the layering in docs/architecture.md:
- the edge (and the shared format code it runs on) never imports cloud code or torch;
- inference code in mridc.cloud never imports training code (mridc.cloud.train);
- the benchmarks and the simulator never import each other; the evaluation library imports neither;
- there is no import cycle between packages, nor between modules.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_imports(path: Path) -> set[str]:
    """Absolute names of the mridc modules (or packages) that one file imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from mridc.x import y` may name a submodule y: count it as an import of it when it is one
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {n for n in found if n in ("mridc", "torch") or n.startswith(("mridc.", "torch."))}


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))}


MODULES = all_modules()


def resolve(name: str) -> str | None:
    """The project module a dotted name refers to (a module, a package, or an attribute of one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {resolve(t) for t in first_party_imports(path) if t.startswith("mridc")}
        graph[name] = {t for t in targets if t and t != name and t != "mridc"}
    return graph


GRAPH = import_graph()


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(importer_pkg: str, forbidden: str, exempt: str | None = None) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, dsts in GRAPH.items() for dst in dsts
                  if within(src, importer_pkg) and within(dst, forbidden) and not (exempt and within(src, exempt)))


def test_the_scan_sees_the_tree():
    # Guards the test itself: a scan that found nothing would pass every rule below.
    assert len(MODULES) > 60
    assert "mridc.cloud.pipeline" in GRAPH["mridc.cloud.cli"] or any(
        within(t, "mridc.cloud") for t in GRAPH["mridc.cloud.cli"])
    assert any(within(t, "mridc.shared") for t in GRAPH["mridc.edge.encoder"])


@pytest.mark.parametrize("layer", ["mridc.edge", "mridc.shared", "mridc.v1"])
def test_edge_side_never_imports_cloud_or_torch(layer):
    bad = violations(layer, "mridc.cloud") + violations(layer, "mridc.bench") + violations(layer, "mridc.lab")
    bad += violations(layer, "mridc.firmware_sim")
    torch_users = sorted(name for name, path in MODULES.items() if within(name, layer)
                         and any(t == "torch" or t.startswith("torch.") for t in first_party_imports(path)))
    assert not bad, f"the camera side reaches cloud/bench code: {bad}"
    assert not torch_users, f"the camera side imports torch: {torch_users}"


def test_inference_modules_are_free_of_training_code():
    # The CLI may dispatch `mridc-cloud train`; no other inference module may reach the trainers.
    bad = [v for v in violations("mridc.cloud", "mridc.cloud.train", exempt="mridc.cloud.train")
           if not v.startswith("mridc.cloud.cli ")]
    assert not bad, bad


def test_bench_and_simulator_never_import_each_other():
    bad = violations("mridc.bench", "mridc.firmware_sim") + violations("mridc.firmware_sim", "mridc.bench")
    bad += violations("mridc.lab", "mridc.bench") + violations("mridc.lab", "mridc.firmware_sim")
    assert not bad, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None (iterative DFS, colours white/grey/black)."""
    colour: dict[str, int] = defaultdict(int)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def package_of(module: str) -> str:
    """A module's package: mridc.cloud.service.worker -> mridc.cloud.service; mridc.cloud.cli -> mridc.cloud."""
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def test_no_cycle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for src, dsts in GRAPH.items():
        for dst in dsts:
            a, b = package_of(src), package_of(dst)
            # a package importing its own subpackage (or the reverse) is containment, not a cycle
            if a != b and not within(a, b) and not within(b, a):
                packages[a].add(b)
    assert find_cycle(packages) is None, f"packages import each other in a circle: {find_cycle(packages)}"


def test_no_cycle_between_modules():
    assert find_cycle(GRAPH) is None, f"modules import each other in a circle: {find_cycle(GRAPH)}"


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
