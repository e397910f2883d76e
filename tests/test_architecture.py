"""The package's flow (docs/architecture.md): no module imports from a later stage,
not even inside a function, and each file of the run folder is named in one module."""

import ast
from pathlib import Path

import pytest

import pyrovae
from pyrovae import run

PACKAGE = Path(pyrovae.__file__).parent

# docs/architecture.md, in order; modules of one stage may import each other
STAGES = [
    {"errors", "atomic", "sites", "run", "data", "networks", "distributed"},
    {"families"},
    {"vae"},
    {"collapse"},
    {"objectives"},
    {"svi"},
    {"training"},
    {"evaluation"},
    {"plots"},
    {"pipelines"},
    {"cli", "__main__"},
]


def stage_of(module: str) -> int:
    """The stage of ``pyrovae.X.Y``, by its first part X."""
    part = module.split(".")[1]
    for index, names in enumerate(STAGES):
        if part in names:
            return index
    raise AssertionError(f"pyrovae.{part} is in no stage of docs/architecture.md")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        if name != "pyrovae":  # the package's face re-exports every stage
            yield name, path


def imported(path: Path, name: str):
    """Every pyrovae module that ``path`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("pyrovae"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base == "pyrovae":  # from pyrovae import run: the names are modules
                yield from (f"pyrovae.{alias.name}" for alias in node.names)
            elif base.startswith("pyrovae."):
                yield base


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: str(v))
def test_no_module_imports_from_a_later_stage(name, path):
    own = stage_of(name)
    later = [target for target in imported(path, name)
             if target == "pyrovae" or stage_of(target) > own]
    assert not later, f"{name} (stage {own}) imports from a later stage: {later}"


def test_each_run_file_is_named_in_one_module():
    names = [run.CONFIG_FILE, run.CHECKPOINT_FILE, run.METRICS_FILE, run.EVALUATION_FILE,
             run.AIS_FILE, run.BDMC_FILE]
    for file_name in names:
        holders = [name for name, path in modules() if f'"{file_name}"' in path.read_text()]
        assert holders == ["pyrovae.run"], (file_name, holders)
