"""Generate the gRPC stubs beside the code that uses them, from proto/elasticmoe/v1/elasticmoe.proto.

Run `python -m server.api.codegen` after editing the .proto; a test checks that the stubs in the
tree are exactly what this produces, so they can never drift from the public API.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "elasticmoe/v1/elasticmoe.proto"
OUT = Path(__file__).resolve().parent
FILES = ("elasticmoe_pb2.py", "elasticmoe_pb2.pyi", "elasticmoe_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(ROOT / "proto" / PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        for name in FILES:
            text = (Path(tmp) / "elasticmoe" / "v1" / name).read_text()
            # the stubs live in the package server.api, not in a top-level `elasticmoe` package
            text = re.sub(r"^from elasticmoe\.v1 import elasticmoe_pb2", "from server.api import elasticmoe_pb2",
                          text, flags=re.M)
            (out_dir / name).write_text(text)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
