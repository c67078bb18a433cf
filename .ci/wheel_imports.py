"""Run from outside the checkout with a venv holding the built wheel: every module of the installed
package imports, and the package data (Serve configs, .proto) is there."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import fusionrec
from fusionrec.core.paths import packaged_config

root = Path(fusionrec.__file__).parent
if "site-packages" not in root.parts:
    sys.exit(f"fusionrec imported from {root}, not from an installed wheel")
modules = [m.name for m in pkgutil.walk_packages(fusionrec.__path__, "fusionrec.")]
for name in modules:
    module = importlib.import_module(name)
    if "site-packages" not in Path(module.__file__).parts:
        sys.exit(f"{name} imported from {module.__file__}, not from the wheel")
for name in ("local.yaml", "gpu.yaml"):
    if not packaged_config(name).is_file():
        sys.exit(f"the wheel lacks deploy/{name}")
if not (root / "v1" / "recommender.proto").is_file():
    sys.exit("the wheel lacks fusionrec/v1/recommender.proto")
from fusionrec.client import proto_path  # noqa: E402  (what `fusionrec proto-path` prints)

if "site-packages" not in proto_path().parts:
    sys.exit(f"fusionrec.client.proto_path() is {proto_path()}, not the wheel's")
packages = sorted({n for n in modules if importlib.import_module(n).__spec__.submodule_search_locations})
print(f"wheel OK: {len(modules)} modules import from {root}; packages {packages}")
