"""Maps the top-level folders into the single `lmkube` import namespace.

The repository layout is the architecture (server/, operator/ at the top), but nothing may install a
top-level module named `server` or `operator` (the latter would shadow the standard library).
"""

from setuptools import find_packages, setup

ROOTS = {"lmkube": "lmkube", "lmkube.server": "server", "lmkube.operator": "operator", "lmkube.gateway": "gateway"}

packages = []
for namespace, folder in ROOTS.items():
    packages.append(namespace)
    packages.extend(f"{namespace}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=ROOTS, package_data={"lmkube": ["py.typed"]})
