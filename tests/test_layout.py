"""House rules that keep the package importable next to the standard library, and imports one-way."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "tessera"
ENTRY_POINT_DIRS = ("jobs", "serve", "bench")  # outside platform/: may import anything from tessera

# Lowest first: a module imports tessera modules only from its own layer or lower ones.
# "x.*" is the package x and everything under it; a plain name is that module only.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("tessera", "tessera.storage", "tessera.config", "tessera.config_reference", "tessera.paths",
              "tessera.published", "tessera.cluster", "tessera.viz")),
    ("data", ("tessera.data.*",)),
    ("models", ("tessera.models.*",)),
    ("artifacts/sampling", ("tessera.artifacts", "tessera.bundle", "tessera.model_card",
                            "tessera.sampling.*")),
    ("training", ("tessera.parallel.*", "tessera.training.*")),
    ("inference", ("tessera.inference.*",)),
    # and every file outside platform/
    ("entry points", ("tessera.stages", "tessera.cli", "tessera.__main__")),
)


def layer_of(module: str, layers=LAYERS) -> int | None:
    for i, (_, patterns) in enumerate(layers):
        for p in patterns:
            if p.endswith(".*") and (module == p[:-2] or module.startswith(p[:-1])):
                return i
            if module == p:
                return i
    return None


def _is_tessera(module: str) -> bool:
    return module == "tessera" or module.startswith("tessera.")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "platform").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _from_base(node: ast.ImportFrom, module: str | None, is_package: bool) -> str | None:
    """The absolute module a `from X import ...` reads from, relative imports resolved."""
    if not node.level:
        return node.module
    if module is None:  # a relative import outside the package: not a tessera import
        return None
    pkg = module.split(".") if is_package else module.split(".")[:-1]
    pkg = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def _in_line_order(tree: ast.AST) -> list[ast.AST]:
    # ast.walk goes breadth-first; messages read better in source order.
    nodes = [n for n in ast.walk(tree) if hasattr(n, "lineno")]
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def _imports(tree: ast.AST, module: str | None, is_package: bool, known: frozenset[str]):
    """(line, statement text, imported module) for every import in the tree, lazy ones included.
    `from tessera import x` is tessera.x when that is a module, else (an attribute such as
    __version__) tessera; `from tessera.config import TesseraConfig` is tessera.config."""
    for node in _in_line_order(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                text = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
                yield node.lineno, text, a.name
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            if base is None:
                continue
            for a in node.names:
                text = f"from {'.' * node.level}{node.module or ''} import {a.name}"
                text += f" as {a.asname}" if a.asname else ""
                sub = f"{base}.{a.name}"
                yield node.lineno, text, (sub if sub in known else base)


def import_violations(sources: Iterable[tuple[str, str | None, str]], layers=LAYERS,
                      known: Iterable[str] = ()) -> list[str]:
    """Every import of a higher layer, and every unmapped tessera module, in `sources`: (path shown
    in messages, module name — None for an entry point outside platform/ — source text). `known` is
    the set of real tessera module names, used to tell `from pkg import module` from
    `from module import attribute`."""
    known = frozenset(known)
    top = len(layers) - 1
    out = []
    for path, module, source in sources:
        is_package = path.endswith("__init__.py")
        if module is None:
            own, own_name = top, path
        else:
            own = layer_of(module, layers)
            if own is None:
                out.append(f"{path}: unmapped module {module}, add it to the layer map")
                continue
            own_name = module
        for line, text, target in _imports(ast.parse(source, path), module, is_package, known):
            if not _is_tessera(target):
                continue
            theirs = layer_of(target, layers)
            if theirs is None:
                out.append(f"{path}:{line}: `{text}` imports unmapped module {target}, "
                           "add it to the layer map")
            elif theirs > own:
                out.append(f"{path}:{line}: `{text}` — {own_name} (layer {own} {layers[own][0]}) imports "
                           f"{target} (layer {theirs} {layers[theirs][0]})")
    return out


def _tree_sources() -> list[tuple[str, str | None, str]]:
    files = [(f, _module_name(f)) for f in sorted(PACKAGE.glob("**/*.py"))]
    for d in ENTRY_POINT_DIRS:
        files += [(f, None) for f in sorted((ROOT / d).glob("**/*.py"))]
    return [(str(f.relative_to(ROOT)), m, f.read_text()) for f, m in files]


def _known_modules() -> frozenset[str]:
    return frozenset(_module_name(f) for f in PACKAGE.glob("**/*.py"))


BANNED = ("ray", "deepspeed", "torch.distributed")


def _banned(module: str) -> bool:
    return any(module == b or module.startswith(b + ".") for b in BANNED)


def distribution_imports(path: str, source: str) -> list[str]:
    """Imports of ray, deepspeed or torch.distributed (also `from torch import distributed` and
    `torch.distributed.x` reached through a plain `import torch`), as 'path:line: statement'."""
    out = []
    for node in _in_line_order(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            out += [f"{path}:{node.lineno}: import {a.name}" for a in node.names if _banned(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                if _banned(node.module) or _banned(f"{node.module}.{a.name}"):
                    out.append(f"{path}:{node.lineno}: from {node.module} import {a.name}")
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed"
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            out.append(f"{path}:{node.lineno}: uses torch.distributed")
    return out


def test_platform_is_a_source_folder_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "tessera" / "__init__.py").exists()


def test_standard_platform_module_still_imports():
    # With platform/ on sys.path (pytest's pythonpath), `import platform` must still be the stdlib.
    mod = importlib.import_module("platform")
    assert hasattr(mod, "system") and callable(mod.python_version)
    assert "site-packages" not in (mod.__file__ or "") and not Path(mod.__file__).is_relative_to(ROOT)
    # And in a fresh interpreter that imports tessera, numpy and ray's dependencies first.
    out = subprocess.run([sys.executable, "-c",
                          "import tessera, numpy, pyarrow, platform; print(platform.system())"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip()


def test_imports_run_one_way():
    sources = _tree_sources()
    assert any(m == "tessera.data.loader" for _, m, _ in sources) and any(m is None for _, m, _ in sources)
    found = import_violations(sources, known=_known_modules())
    assert not found, f"{len(found)} import(s) against the layer order:\n" + "\n".join(found)


def test_layer_checker_reports_what_it_should():
    # A lazy import inside a function, a relative one, a whole-module one and a new module: all caught.
    fake_data = textwrap.dedent("""
        from tessera import storage
        from tessera.config import TesseraConfig

        def load():
            from tessera.training import ray_io
            return ray_io
        """)
    fake_models = "from ..inference import encode\nimport tessera.sampling.sampler as s\n"
    found = import_violations([
        ("platform/tessera/data/x.py", "tessera.data.x", fake_data),
        ("platform/tessera/models/y.py", "tessera.models.y", fake_models),
        ("platform/tessera/brand_new.py", "tessera.brand_new", ""),
        ("jobs/z.py", None, "from tessera.inference import encode\nfrom tessera import nowhere_mapped\n"),
    ], known=_known_modules() | {"tessera.nowhere_mapped"})
    assert found == [
        "platform/tessera/data/x.py:6: `from tessera.training import ray_io` — tessera.data.x (layer 1 data) "
        "imports tessera.training.ray_io (layer 4 training)",
        "platform/tessera/models/y.py:1: `from ..inference import encode` — tessera.models.y "
        "(layer 2 models) imports tessera.inference.encode (layer 5 inference)",
        "platform/tessera/models/y.py:2: `import tessera.sampling.sampler as s` — tessera.models.y "
        "(layer 2 models) imports tessera.sampling.sampler (layer 3 artifacts/sampling)",
        "platform/tessera/brand_new.py: unmapped module tessera.brand_new, add it to the layer map",
        "jobs/z.py:2: `from tessera import nowhere_mapped` imports unmapped module tessera.nowhere_mapped, "
        "add it to the layer map",
    ]
    # Attributes of a package resolve to the package itself: `__version__` is tessera (base).
    assert import_violations([("platform/tessera/published.py", "tessera.published",
                               "def f():\n    from tessera import __version__\n")],
                             known=_known_modules()) == []


def test_models_and_sampling_import_torch_only():
    found = []
    for folder in ("models", "sampling"):
        for f in sorted((PACKAGE / folder).glob("**/*.py")):
            found += distribution_imports(str(f.relative_to(ROOT)), f.read_text())
    assert not found, "models/ and sampling/ import distribution code:\n" + "\n".join(found)


def test_distribution_checker_reports_what_it_should():
    source = textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from torch import distributed
        from torch import nn

        def f():
            import ray.train
            from deepspeed.ops.adam import FusedAdam
            return torch.distributed.get_rank()
        """)
    assert distribution_imports("m.py", source) == [
        "m.py:3: import torch.distributed",
        "m.py:4: from torch import distributed",
        "m.py:8: import ray.train",
        "m.py:9: from deepspeed.ops.adam import FusedAdam",
        "m.py:10: uses torch.distributed",
    ]


def test_pipeline_modules_import_without_torch():
    # jobs/pipeline.py learns every stage's paths and state from these; it must not pay for torch.
    code = ("import sys; import tessera.stages, tessera.paths, tessera.artifacts, tessera.config; "
            "print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": "platform"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing tessera.stages/paths/artifacts/config imported torch"
