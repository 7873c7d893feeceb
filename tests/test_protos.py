"""The committed generated protobuf modules are exactly what the .proto sources produce."""

import pathlib

import pytest

from protos.generate import PROTO_DIR, generate, proto_sources

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the protos")


def test_every_proto_has_committed_generated_modules():
    for source in proto_sources():
        stem = source.stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (PROTO_DIR / f"{stem}{suffix}").is_file(), f"missing {stem}{suffix}: run python -m protos.generate"


def test_generated_modules_match_the_sources(tmp_path: pathlib.Path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} differs from what {path.name.split('_pb2')[0]}.proto generates: "
            "run python -m protos.generate and commit the result"
        )
