"""Regenerate the Python stubs from the .proto files: ``python -m protos.generate``.

Needs grpcio-tools (the ``test`` extra). Run from anywhere; writes next to the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.name for p in (ROOT / "protos").glob("*.proto"))


def generate(out_dir: Path = ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}"]
    args += [f"protos/{name}" for name in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
