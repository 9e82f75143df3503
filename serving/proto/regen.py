"""Regenerate the checked-in Python code for serving/proto/dsjax/v1/*.proto.

    python -m serving.proto.regen

Equivalent to running, from the repository root:

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \\
        serving/proto/dsjax/v1/dsjax.proto serving/proto/dsjax/v1/worker.proto

The include root is the repository root, so generated imports read `from serving.proto.dsjax.v1
import dsjax_pb2` (a root of serving/proto would generate `from dsjax.v1 import ...`, which
collides with the `dsjax` package). The generated code checks at import that the protobuf runtime
is at least the version of the protoc that generated it; regenerate after changing grpcio-tools.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("serving/proto/dsjax/v1/dsjax.proto", "serving/proto/dsjax/v1/worker.proto")


def main() -> int:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *(str(ROOT / p) for p in PROTOS)]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
