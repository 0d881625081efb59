"""The import rules of docs/ARCHITECTURE.md, read from the source: a module imports only from earlier
layers (or its own package), never another package's private name, and bench/ uses public names only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dcube"

# the pipeline's order: a module may import its own package and anything strictly earlier
LAYERS = {
    "utils": 0, "config": 1,
    "data": 2, "diffusion": 3, "generate": 4, "features": 5, "classify": 6, "evaluate": 7,  # the stages
    "latent": 8,  # the latent method's stage parts (its plug-in, latent.run, is a method below)
    "preflight": 9, "run": 10,  # the orchestrator
    "pipeline": 11, "latent.run": 11,  # the methods, plugged into dcube.run
    "predict": 12, "compare": 12, "report": 13, "export": 13,  # applications
    "api": 14, "cli": 15, "": 16,  # the Python API, the CLI, the package itself (lazy names)
}


def package_of(module: str) -> str:
    """'dcube.latent.run' -> 'latent.run'; 'dcube.classify.trainer' -> 'classify'; 'dcube' -> ''."""
    parts = module.split(".")[1:]
    if parts[:2] == ["latent", "run"]:
        return "latent.run"
    return parts[0] if parts else ""


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dcube_imports(path: Path, module: str | None = None):
    """(line, imported module, imported name or None) for every dcube import, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "dcube":
                    yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            if target.split(".")[0] == "dcube":
                for a in node.names:
                    yield node.lineno, target, a.name


def layer_breaks(src: Path = SRC) -> list[str]:
    out = []
    for path in sorted(src.rglob("*.py")):
        module = module_name(path, src)
        own = package_of(module)
        for line, target, name in dcube_imports(path, module):
            other = package_of(target if name is None or target != "dcube" else f"dcube.{name}")
            if target == "dcube" and name == "__version__":
                continue  # the version string, defined before any import
            where = f"{path.relative_to(src.parent)}:{line}: {module} imports {target}{'.' + name if name else ''}"
            if other != own and other.split(".")[0] != own.split(".")[0] and LAYERS[other] >= LAYERS[own]:
                out.append(f"{where} (layer {other} is not before {own})")
            elif own == "latent" and other == "latent.run":
                out.append(f"{where} (a stage part imports its method)")
            if name and name.startswith("_") and other.split(".")[0] != own.split(".")[0]:
                out.append(f"{where} (a private name of another package)")
    return out


def test_every_package_has_a_layer():
    packages = {package_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_no_module_imports_a_later_layer_or_a_private_name_of_another_package():
    assert layer_breaks() == []


def test_the_check_sees_a_break(tmp_path):
    """The rule catches what it is for: a stage that imports a later stage, and a private name."""
    pkg = tmp_path / "dcube"
    for name, body in {"data/__init__.py": "from dcube.classify.trainer import build_head\n",
                       "evaluate/fid.py": "from dcube.classify.subfeatures import _secret\n",
                       "classify/trainer.py": "from dcube.data import load_data\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(body)
    breaks = layer_breaks(pkg)
    assert len(breaks) == 2, breaks
    assert "layer classify is not before data" in breaks[0] and "private name" in breaks[1]


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_uses_public_dcube_names_only(path):
    private = [f"{path.name}:{line}: {target}.{name}" for line, target, name in dcube_imports(path, "bench")
               if (name and name.startswith("_")) or any(part.startswith("_") for part in target.split("."))]
    assert private == []
