"""The checkout is the installed package: a module added under server/ or operator/ imports at once in a new
interpreter, without re-running set-up, and nothing installs a top-level `server` or `operator`."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lmkube

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> dict:
    """Runs `code` in a fresh interpreter of this venv (-I: no PYTHONPATH, no script directory; -B: no
    __pycache__ left in the checkout) and returns the JSON it prints."""
    done = subprocess.run([sys.executable, "-I", "-B", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def new_files() -> Iterator[list[Path]]:
    """Paths of files a test writes into the checkout, removed afterwards whatever happens."""
    written: list[Path] = []
    yield written
    for path in written:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def test_the_installed_package_is_this_checkout() -> None:
    assert Path(lmkube.__file__).resolve() == REPO / "lmkube" / "__init__.py"


def test_a_new_module_imports_without_setting_up_again(tmp_path: Path, new_files: list[Path]) -> None:
    tag = f"probe_{secrets.token_hex(4)}"
    server_module = REPO / "server" / f"_{tag}.py"
    operator_module = REPO / "operator" / f"_{tag}.py"
    package = REPO / "server" / f"_{tag}_pkg"
    for path in (server_module, operator_module, package):
        new_files.append(path)
    server_module.write_text("FROM = 'server'\n")
    operator_module.write_text("FROM = 'operator'\n")
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "inner.py").write_text("from .. import config\nDEFAULT_PORT = config.ServerConfig.port\n")

    found = run_python(
        "import json\n"
        f"from lmkube.server import _{tag} as s\n"
        f"from lmkube.operator import _{tag} as o\n"
        f"from lmkube.server._{tag}_pkg import inner\n"
        "print(json.dumps({'server': s.FROM, 's_file': s.__file__, 'operator': o.FROM, 'o_file': o.__file__,\n"
        "                  'port': inner.DEFAULT_PORT}))\n",
        cwd=tmp_path)
    assert found == {"server": "server", "s_file": str(server_module), "operator": "operator",
                     "o_file": str(operator_module), "port": 1234}


def test_no_top_level_server_or_operator_is_installed(tmp_path: Path) -> None:
    found = run_python(
        "import importlib.util, json, operator, sysconfig\n"
        "import lmkube.server, lmkube.operator.reconcile\n"
        "print(json.dumps({'server': importlib.util.find_spec('server') is not None,\n"
        "                  'operator': operator.__file__, 'stdlib': sysconfig.get_paths()['stdlib'],\n"
        "                  'itemgetter': hasattr(operator, 'itemgetter'),\n"
        "                  'lmkube.server': lmkube.server.__file__,\n"
        "                  'lmkube.operator': list(lmkube.operator.__path__)}))\n",
        cwd=tmp_path)
    assert found["server"] is False
    assert Path(found["operator"]).parent == Path(found["stdlib"]) and found["itemgetter"]
    assert found["lmkube.server"] == str(REPO / "server" / "__init__.py")
    assert found["lmkube.operator"] == [str(REPO / "operator")]


def test_the_checkout_root_as_working_directory_still_finds_the_standard_operator() -> None:
    # `python -m ...` from the checkout puts it first on sys.path: operator/ is a namespace portion (no
    # __init__.py), which never wins over the standard library's module; lmkube resolves to the checkout.
    # (`operator` is imported at start-up already, so ask the path finder what an import would find.)
    found = run_python(
        "import importlib.machinery, json, sys\n"
        "sys.path.insert(0, '')\n"
        "spec = importlib.machinery.PathFinder.find_spec('operator', sys.path)\n"
        "import lmkube.operator.reconcile as r\n"
        "print(json.dumps({'operator': spec.origin, 'reconcile': r.__file__}))\n",
        cwd=REPO)
    assert found["operator"].endswith("/operator.py") and not found["operator"].startswith(str(REPO))
    assert found["reconcile"] == str(REPO / "operator" / "reconcile.py")
