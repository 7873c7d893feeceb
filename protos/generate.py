"""Regenerate the Python modules of every .proto in this folder.

Run from anywhere: ``python -m protos.generate`` (needs grpcio-tools, in the
``test`` extra). The generated files are committed; ``tests/test_protos.py``
fails when they differ from what this produces.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

PROTO_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent


def proto_sources() -> list[pathlib.Path]:
    """The .proto files of the package, sorted."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir/protos; return them."""
    from grpc_tools import protoc  # imported here: only needed to regenerate

    out_dir = pathlib.Path(out_dir)
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_sources()]
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        # A plain RuntimeError: protos is the bottom layer and cannot import collectives.errors, and this is a
        # developer's tool failing (protoc printed why), not loconet's API misused.
        raise RuntimeError(f"protoc failed with exit code {code} for {sources}")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    """Regenerate the modules under --out (default: the repository), naming each file written; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT)
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
