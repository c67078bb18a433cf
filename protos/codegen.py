"""Generate the Python gRPC code for protos/ (run: python protos/codegen.py [--check])."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PROTOS = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under protos/ into out_dir."""
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *map(str, PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    if "--check" not in sys.argv:
        generate(ROOT)
        return
    # CI: fail when the committed generated code differs from a fresh generation.
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {p.relative_to(tmp): p for p in Path(tmp).rglob("*.py*")}
        stale = [str(rel) for rel, path in fresh.items()
                 if not (ROOT / rel).exists() or not filecmp.cmp(path, ROOT / rel, shallow=False)]
    if stale:
        raise SystemExit(f"generated code is stale, run `make proto`: {stale}")
    print("generated code is up to date")


if __name__ == "__main__":
    main()
