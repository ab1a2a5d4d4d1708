"""Imports point down the layers, and no module imports itself through others.

memext is layered (the team's DESIGN.md, "Layers"): a module may import from its own layer and
the layers below, never from a layer above, so the bottom can be read, tested and reused without
the top. ``LAYERS`` below is that order, top first, as built. A module's layer is named by its
first component under ``memext`` (``memext.nn.attention.full`` is in ``nn``; the package root,
``memext/__init__.py``, the public facade, is ``""``). Why each layer sits where it does:

- ``cli`` (and ``__main__``) drives everything;
- ``variants`` lists every registry, from every layer that has one, for the command line;
- ``bench`` (the `memext bench` harness) and ``evals`` measure, and nothing below them may
  depend on a measurement; the harness sits above the evaluations, so what both use (peak
  memory) lives at the bottom, not in the harness;
- ``extend`` and ``pipelines`` are applications of trained models (``extend`` fine-tunes
  through ``train``); they, the evaluations and the command line open models through
  ``adapters``;
- ``adapters``: every model memext can read (a memext run, a Hugging Face directory) behind one
  contract; above ``train`` (a kind may fine-tune through it), ``checkpoint`` and ``hf``, which
  it opens, and ``data`` (a run's validation text);
- ``train`` runs the loop over what is below;
- ``dist``: distributed training pieces the trainer drives: joining torchrun's process group,
  the data-parallel strategies (DDP, FSDP2), context-parallel attention over process groups;
- the package root re-exports ``load``, ``Config`` and ``build_model``;
- ``checkpoint`` reads and writes runs, rebuilding a model (with its curriculum stage's rotary),
  with ``dcp`` beside it: sharded checkpoints (``torch.distributed.checkpoint``), which a
  single process reads too;
- ``model`` builds a ``LongLM`` from a config;
- ``data``, ``infer`` and ``hf``: corpora, stores and synthetic tasks; caches and generation;
  Hugging Face glue;
- ``config_docs``: the settings reference generated from the config's field docs;
- ``config``, ``tokenizer`` and ``curriculum`` (the stages, a pure function of the config);
- ``source`` (a ``data.mixture`` record) and ``presets`` (the named configs), which ``config``
  reads, on ``fields`` (how a config record declares, checks and parses its fields);
- ``nn``: blocks that never read a config;
- ``io``, ``errors``, ``runtime``, ``profiling`` and ``registry``: leaves.

Every import counts, function-local and ``TYPE_CHECKING`` ones too: a local import is how an
upward dependency or a cycle hides. The exceptions are written below with their reasons, and an
exception that is no longer needed fails the test, so the list only shrinks. The check reads the
source (``ast``); it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import memext

SRC = Path(memext.__file__).parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "__main__"),
    ("variants",),
    ("bench",),
    ("evals",),
    ("extend", "pipelines"),
    ("adapters",),
    ("train",),
    ("dist",),
    ("",),
    ("checkpoint", "dcp"),
    ("model",),
    ("data", "infer", "hf"),
    ("config_docs",),
    ("config", "tokenizer", "curriculum"),
    ("source", "presets"),
    ("fields",),
    ("nn",),
    ("io", "errors", "runtime", "profiling", "registry"),
)

# (importer's layer name, imported layer name) -> why the upward import stays for now.
UPWARD_ALLOWED: dict[tuple[str, str], str] = {
    ("source", "data"): "data.mixture's Source checks its task name against data.tasks.TASKS "
    "(a function-local import, because data imports config); to go when task names are checked "
    "where the mixture is built, or the task registry sits below config",
    ("runtime", ""): "provenance() reads memext.__version__, inside the function: the version "
    "is declared once, in the package root, where pyproject reads it",
}

# Packages whose __init__ imports its own submodules after defining what they import from it:
# a registry package, whose __init__ defines the contract and registry and then imports every
# variant so that it registers; each variant imports the contract back. The cycle is the pattern,
# and the package's import order makes it safe.
REGISTRY_PACKAGES: dict[str, str] = {
    "memext.nn.attention": "attention kernels register on import",
    "memext.nn.memory": "memory variants register on import",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, source: str, is_package: bool = False) -> set[tuple[str, int]]:
    """(imported memext module, line) for every import in module ``name``, at any depth."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from memext import checkpoint` imports the submodule; `from memext import load`
            # the package.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found.update((t, node.lineno) for t in targets if t in MODULES)
    return found


GRAPH = {
    name: _imports(name, path.read_text(encoding="utf-8"), path.name == "__init__.py")
    for name, path in MODULES.items()
}


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


RANK = {layer: len(LAYERS) - i for i, group in enumerate(LAYERS) for layer in group}


def test_every_module_has_a_layer() -> None:
    missing = sorted({_layer(m) for m in MODULES} - set(RANK))
    assert not missing, f"place {missing} in LAYERS (and say why in the docstring)"


def test_imports_point_down() -> None:
    upward, used = [], set()
    for module, targets in GRAPH.items():
        for target, line in sorted(targets):
            pair = (_layer(module), _layer(target))
            if RANK[pair[1]] <= RANK[pair[0]]:
                continue
            if pair in UPWARD_ALLOWED:
                used.add(pair)
                continue
            upward.append(f"{module}:{line} imports {target} (layer {pair[1]!r} > {pair[0]!r})")
    assert not upward, "upward imports:\n" + "\n".join(upward)
    stale = sorted(set(UPWARD_ALLOWED) - used)
    assert not stale, f"no longer needed: drop {stale} from UPWARD_ALLOWED"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        graph[module] = set()
        for target, _ in targets:
            registering = module in REGISTRY_PACKAGES and target.startswith(f"{module}.")
            if target != module and not registering:
                graph[module].add(target)
    return graph


def test_no_import_cycles() -> None:
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_registry_packages_still_register() -> None:
    # An entry whose package no longer imports its variants is stale: drop it.
    for package in REGISTRY_PACKAGES:
        assert any(t.startswith(f"{package}.") for t, _ in GRAPH.get(package, ())), package


def test_the_check_sees_local_imports_and_cycles() -> None:
    source = (
        "from memext import checkpoint, load\n"
        "from .nn import attention\n"
        "def f():\n"
        "    from memext.config import Config\n"
        "    import memext.io\n"
    )
    assert _imports("memext.model", source) == {
        ("memext.checkpoint", 1),
        ("memext", 1),
        ("memext.nn.attention", 2),
        ("memext.config", 4),
        ("memext.io", 5),
    }
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
