"""The serving Bento carries exactly the code its service imports, and its image installs exactly the
packages that code imports: ``serving/bentofile.yaml``'s includes and ``requirements/serving.in``
(locked to ``serving.txt`` at the versions of ``base.txt``, which the tests run)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from serving_fixtures import serving_home, shared_registry

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("medops", "pipelines", "serving", "monitoring", "dags")
ENTRY = "serving.service"


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def module_imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (not under TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # kept if it is a module
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def import_closure(root: Path, entry: str = ENTRY) -> tuple[set[str], set[str]]:
    """(files under ``root`` that ``entry`` needs, relative; top-level names of the other imports)."""
    files: set[str] = set()
    external: set[str] = set()
    todo, seen = [entry], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(root, module)
        if path is None:
            continue  # a name imported from a module, not a module
        parts = module.split(".")
        for depth in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            todo.append(".".join(parts[:depth]))
        files.add(str(path.relative_to(root)))
        for name in module_imports(path, module):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                todo.append(name)
            elif top not in sys.stdlib_module_names:
                external.add(top)
    return files, external


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(_normal(re.split(r"[<>=!~\[; ]", line)[0]))
    return names


def pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements text, by normalised name."""
    return {_normal(n): v for n, v in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)}


def bentofile() -> dict:
    return yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())


def test_the_bento_includes_exactly_the_modules_the_service_imports():
    included = {str(path.relative_to(REPO)) for pattern in bentofile()["include"] for path in REPO.glob(pattern)}
    needed, _ = import_closure(REPO)
    assert "serving/rollout.py" not in needed  # the checker follows imports, it does not list serving/
    assert included == needed, {"not imported": included - needed, "missing": needed - included}


def test_serving_requirements_are_exactly_what_the_bento_code_imports():
    _, external = import_closure(REPO)
    distributions = packages_distributions()
    imported = {_normal(distributions[name][0]) for name in external}
    assert imported == requirement_names(REPO / "requirements" / "serving.in")
    assert bentofile()["python"]["requirements_txt"] == "requirements/serving.txt"


def test_the_serving_lock_pins_what_the_tests_run():
    serving = pins((REPO / "requirements" / "serving.txt").read_text())
    base = pins((REPO / "requirements" / "base.txt").read_text())
    assert requirement_names(REPO / "requirements" / "serving.in") <= serving.keys()
    assert {name: version for name, version in serving.items() if base.get(name) != version} == {}
    assert len(serving) < len(base) / 2  # no Airflow, MLflow, DVC, Evidently in the serving image


# Run with the Bento's src first on sys.path and nothing that can find medops' own packages
# elsewhere (the repository, the editable install): any module the Bento lacks fails to import.
ISOLATED_IMPORT = """
import importlib, importlib.util, json, os, sys
src, first_party = sys.argv[1], sys.argv[2].split(",")
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in getattr(finder, "__module__", "")]
def finds_first_party(entry):
    return any(os.path.isdir(os.path.join(entry or ".", top)) for top in first_party)
sys.path[:] = [entry for entry in sys.path if not finds_first_party(entry)]
sys.path.insert(0, src)
assert importlib.util.find_spec("pipelines.model_registry") is None, "the repository is still visible"
modules = sys.argv[3].split(",")
for module in modules:
    importlib.import_module(module)
from medops.core.settings import get_settings
get_settings()
loaded = {name: module.__file__ for name, module in list(sys.modules.items())
          if name.split(".")[0] in first_party and getattr(module, "__file__", None)}
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def built_bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serving import rollout

    tracking_uri, version = shared_registry()
    with serving_home(tmp_path_factory.mktemp("bento"), MEDOPS_MLFLOW_TRACKING_URI=tracking_uri) as settings:
        prepared = rollout.prepare_bento(version, settings)
        return settings.bentoml_home / "bentos" / prepared.bento.replace(":", "/")


def test_the_built_bento_runs_on_its_own_code_and_serving_txt(built_bento: Path, tmp_path: Path):
    src = built_bento / "src"
    shipped = {str(path.relative_to(src)) for path in src.rglob("*.py")}
    needed, _ = import_closure(REPO)
    assert shipped == needed
    requirements = (built_bento / "env" / "python" / "requirements.txt").read_text()
    assert pins((REPO / "requirements" / "serving.txt").read_text()).items() <= pins(requirements).items()
    assert "apache-airflow" not in requirements and "mlflow" not in requirements

    modules = sorted(path.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for path in shipped)
    env = {**os.environ, "MEDOPS_HOME": str(tmp_path / "home"), "MEDOPS_SERVING_MODEL_VERSION": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_IMPORT, str(src), ",".join(FIRST_PARTY), ",".join(modules)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(modules) <= loaded.keys()
    assert {name: path for name, path in loaded.items() if not path.startswith(str(src))} == {}
