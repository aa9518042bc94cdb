"""The .mar ships serving code only: the handler package, its entry file, the config and the pipeline (stored).

The build side (builder/), the client (sdclient/), the test harness (harness/) and the tests stay in the
repository; nothing in handler/ may need them, or find its way back to the repository at run time.
"""

import ast
import json
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

HANDLER = REPO_ROOT / "handler"
CORE = HANDLER / "core"
NOT_SHIPPED = {"builder", "sdclient", "harness", "tests", "benchmarks", "scripts", "conftest", "helpers"}
FORBIDDEN_IMPORTS = NOT_SHIPPED | {"requests"}  # requests: a client library, not a worker dependency


@pytest.fixture(scope="module")
def shipped(tiny_mar) -> list[str]:
    with zipfile.ZipFile(tiny_mar) as archive:
        names = sorted(archive.namelist())
    print("files shipped in", tiny_mar.name, ":\n  " + "\n  ".join(names))
    return names


@pytest.fixture(scope="module")
def manifest(tiny_mar) -> dict:
    with zipfile.ZipFile(tiny_mar) as archive:
        return json.loads(archive.read("MAR-INF/MANIFEST.json"))


def listing(names) -> str:
    return "\n  " + "\n  ".join(names)


def handler_sources() -> list[str]:
    return sorted(path.relative_to(REPO_ROOT).as_posix() for path in HANDLER.rglob("*.py")
                  if "__pycache__" not in path.parts)


def test_the_archive_holds_only_the_serving_files(shipped, manifest):
    entry = manifest["model"]["handler"]
    pipeline = [name for name in shipped if name.startswith("pipeline/")]
    assert "pipeline/model_index.json" in pipeline and "pipeline/unet/diffusion_pytorch_model.safetensors" in pipeline
    expected = sorted({"MAR-INF/MANIFEST.json", "model-config.yaml", entry, *handler_sources(), *pipeline})
    assert shipped == expected, (f"shipped:{listing(shipped)}\nexpected:{listing(expected)}\n"
                                 f"unexpected:{listing(sorted(set(shipped) - set(expected)))}\n"
                                 f"missing:{listing(sorted(set(expected) - set(shipped)))}")


def test_the_pipeline_is_stored_uncompressed_and_world_readable(tiny_mar):
    """Stored entries make TorchServe's extraction a plain copy, and the handler loads them where they land."""
    with zipfile.ZipFile(tiny_mar) as archive:
        entries = [entry for entry in archive.infolist() if entry.filename.startswith("pipeline/")]
    assert entries
    for entry in entries:
        assert entry.compress_type == zipfile.ZIP_STORED, entry.filename
        assert (entry.external_attr >> 16) & 0o777 == 0o644, entry.filename


def test_nothing_but_python_sources_under_handler(shipped):
    wrong = [name for name in shipped if name.startswith("handler/")
             and (not name.endswith(".py") or "__pycache__" in name)]
    assert not wrong, f"non-source files shipped under handler/:{listing(wrong)}\nshipped:{listing(shipped)}"
    stray = [name for name in shipped if name.split("/")[0] in NOT_SHIPPED]
    assert not stray, f"build, client, harness or test files shipped:{listing(stray)}\nshipped:{listing(shipped)}"


def test_the_entry_file_is_the_packaged_handler_module(tiny_mar, manifest, shipped):
    entry = manifest["model"]["handler"]
    assert "/" not in entry and entry.endswith(".py"), f"entry {entry!r}; shipped:{listing(shipped)}"
    with zipfile.ZipFile(tiny_mar) as archive:
        assert archive.read(entry) == (HANDLER / entry).read_bytes()
        assert manifest["model"]["configFile"] == "model-config.yaml"
        assert archive.read("model-config.yaml") == (REPO_ROOT / "model-config.yaml").read_bytes()


# ------------------------------------------------------------------------------------------- the sources


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: str | None = None, root: Path = REPO_ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, relative imports resolved against its package.

    ``from a.b import c`` gives both ``a.b`` and ``a.b.c`` (c may be a module); importing ``a.b.c`` also runs
    the packages ``a`` and ``a.b``, which are listed too.
    """
    if package is None:
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parts = package.split(".") if package else []
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > len(parts):
                found.append((node.lineno, "." * node.level + (node.module or "")))  # climbs out of handler/
                continue
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    with_packages = []
    for line, module in found:
        pieces = [] if module.startswith(".") else module.split(".")
        with_packages += [(line, ".".join(pieces[:end])) for end in range(1, len(pieces))] + [(line, module)]
    return with_packages


def repository_tricks(path: Path) -> list[str]:
    """Ways a module could reach outside its own package: walking up from __file__, editing sys.path."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Attribute) and node.attr == "parent" and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "parent":
            problems.append(f"{line}: .parent.parent")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "parents":
            problems.append(f"{line}: .parents[...]")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dirname" \
                and any(isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                        and arg.func.attr == "dirname" for arg in node.args):
            problems.append(f"{line}: os.path.dirname(os.path.dirname(...))")
        elif isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            problems.append(f"{line}: sys.path")
        elif isinstance(node, ast.Name) and node.id in {"REPO_ROOT", "REPOSITORY_ROOT"}:
            problems.append(f"{line}: {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and str(REPO_ROOT) in node.value:
            problems.append(f"{line}: the repository's path {node.value!r}")
    return problems


def sources(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def test_the_handler_imports_nothing_that_is_not_shipped():
    problems = [f"{path.relative_to(REPO_ROOT)}:{line}: imports {module}"
                for path in sources(HANDLER) for line, module in imported_modules(path)
                if module.startswith(".") or module.split(".")[0] in FORBIDDEN_IMPORTS]
    assert not problems, "handler/ must run from the .mar alone:" + listing(problems)


def test_the_handler_does_not_reach_back_into_the_repository():
    problems = [f"{path.relative_to(REPO_ROOT)}:{problem}" for path in sources(HANDLER)
                for problem in repository_tricks(path)]
    assert not problems, "handler/ must not find files outside its own package:" + listing(problems)


def torchserve_chains(package: Path, core: Path) -> list[str]:
    """Import chains from a module under ``core`` to ``ts``, following the modules of ``package``."""
    root = package.parent
    modules = {module_name(path, root): path for path in sources(package)}
    problems = set()
    for start in (module_name(path, root) for path in sources(core)):
        chains, seen = [[start]], {start}
        while chains:
            chain = chains.pop()
            for line, module in imported_modules(modules[chain[-1]], root=root):
                if module == "ts":  # every import of ts.x also lists the package ts
                    problems.add(" -> ".join(chain) + f" imports ts (line {line})")
                elif module in modules and module not in seen:
                    seen.add(module)
                    chains.append(chain + [module])
    return sorted(problems)


def test_the_core_does_not_depend_on_torchserve():
    """handler/core/* and every handler module it imports, transitively, stay free of ``ts``."""
    problems = torchserve_chains(HANDLER, CORE)
    assert not problems, "the core must not import TorchServe:" + listing(problems)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The AST checks themselves, on a module that breaks every rule."""
    bad = tmp_path / "bad.py"
    bad.write_text("import requests\nfrom builder.build_mar import build\nfrom ... import tests\nimport sys\n"
                   "from pathlib import Path\nROOT = Path(__file__).parent.parent\nTOP = Path(__file__).parents[2]\n"
                   "sys.path.insert(0, '..')\nimport os\nUP = os.path.dirname(os.path.dirname(__file__))\n")
    modules = {module for _, module in imported_modules(bad, "handler.core")}
    assert modules == {"requests", "builder", "builder.build_mar", "builder.build_mar.build", "...", "sys", "pathlib",
                       "pathlib.Path", "os"}
    problems = [problem.split(": ", 1)[1] for problem in repository_tricks(bad)]
    assert problems and sorted(problems) == sorted([".parent.parent", ".parents[...]", "sys.path",
                                                    "os.path.dirname(os.path.dirname(...))"]), problems


def test_the_torchserve_check_follows_imports(tmp_path):
    package = tmp_path / "handler"
    (package / "core").mkdir(parents=True)
    for name, text in {"__init__.py": "", "metrics.py": "from ts.metrics.metric_type_enum import MetricTypes\n",
                       "core/__init__.py": "", "core/clean.py": "import json\n",
                       "core/generation.py": "from .. import metrics\n"}.items():
        (package / name).write_text(text)
    assert torchserve_chains(package, package / "core") == [
        "handler.core.generation -> handler.metrics imports ts (line 1)"]
