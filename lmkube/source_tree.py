"""In a source checkout, `lmkube.server`, `lmkube.operator` and `lmkube.gateway` are the top-level folders.

A wheel installs them inside the package (lmkube/server, ...: setup.py's package_dir, whose ROOTS this mirrors). A
checkout keeps them at the top, the layout the project is known by, and must not put the checkout itself
on sys.path: `import server` would then find server/, and the checkout's folders would stand in for any
top-level name. This finder maps exactly these names to their folders, so the editable install only has
to make `lmkube` importable, and a new module under server/ or operator/ imports at once, without
re-running set-up (tests/test_source_tree.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path
from types import ModuleType

SUBPACKAGES = {"lmkube.server": "server", "lmkube.operator": "operator", "lmkube.gateway": "gateway"}


class SourceTreeFinder:
    """A meta path finder for SUBPACKAGES in the checkout at `root`.

    Their submodules need no finder: the standard one searches the package's `__path__`, which is the folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        folder = SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        location = self.root / folder
        init = location / "__init__.py"
        if init.is_file():
            return spec_from_file_location(fullname, init, submodule_search_locations=[str(location)])
        if location.is_dir():
            # operator/ has no __init__.py (operator/README.md says why): a namespace package, as in a wheel.
            spec = ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(location)]
            return spec
        return None

    def __repr__(self) -> str:
        return f"SourceTreeFinder({str(self.root)!r})"


def install(package_dir: Path) -> None:
    """Adds the finder when the `lmkube` package at `package_dir` is the lmkube/ folder of a checkout."""
    root = package_dir.parent
    if (package_dir / "server").exists() or not (root / "server" / "__init__.py").is_file():
        return  # an installed wheel (the subpackages are inside lmkube/), or lmkube/ copied on its own
    if not any(isinstance(finder, SourceTreeFinder) and finder.root == root for finder in sys.meta_path):
        sys.meta_path.append(SourceTreeFinder(root))
