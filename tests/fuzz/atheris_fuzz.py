"""Coverage-guided fuzzing of the byte decoders with atheris (libFuzzer for Python), beside the Hypothesis targets.

Run one target, with any libFuzzer options after its name::

    python tests/fuzz/atheris_fuzz.py wire -max_total_time=60
    python tests/fuzz/atheris_fuzz.py manifest -runs=100000 corpus_dir/

Targets (each gets raw bytes, as a hostile peer sends them):

- ``wire``: ``collectives.net.wire.decode_chunk``, and protobuf must read the same header and payload;
- ``statechunk``: ``collectives.statesync.format._parse_chunk``, the same against protobuf;
- ``manifest``: a ``StateManifest`` whose fields are drawn from the bytes (structure-aware, in place of
  libprotobuf-mutator), checked by ``_check_manifest`` and, if accepted, turned into tensors by
  ``_Receiver`` (small limits, so nothing big is allocated).

A target raises on any other outcome than an answer or the decoder's own refusal; libFuzzer then
saves the input (``crash-*``, in the current directory unless ``-artifact_prefix=DIR/`` says otherwise)
and exits non-zero. The collectives package is instrumented, so
inputs that reach new branches of it are kept and mutated further. atheris is not a dependency
of loconet: ``pip install atheris`` (3.11 wheels need no compiler). libprotobuf-mutator's Python
binding (``atheris-libprotobuf-mutator``) builds from source only and is not used.
"""

from __future__ import annotations

import math
import sys

import atheris
import torch

with atheris.instrument_imports(include=["collectives"]):
    from collectives.errors import ProtocolError
    from collectives.net.wire import decode_chunk
    from collectives.statesync.format import StateSyncConfig, _check_manifest, _parse_chunk, _Receiver

from google.protobuf.message import DecodeError

from protos import collective_pb2, state_pb2

SMALL = StateSyncConfig(
    chunk_bytes=1024, block_bytes=4096, max_state_bytes=1 << 20, max_meta_bytes=4096, max_tensors=64
)


def wire(data: bytes) -> None:
    """decode_chunk answers as protobuf reads the bytes, or refuses with ProtocolError."""
    try:
        header, payload = decode_chunk(data)
    except ProtocolError:
        return
    reference = collective_pb2.PartChunk.FromString(data)
    if bytes(payload) != reference.payload:
        raise AssertionError("decode_chunk's payload differs from protobuf's")
    reference.payload = b""
    if header != reference:
        raise AssertionError("decode_chunk's header differs from protobuf's")


def statechunk(data: bytes) -> None:
    """_parse_chunk answers as protobuf reads the bytes (bar a manifest's insides), or refuses with ValueError."""
    try:
        manifest, offset, payload = _parse_chunk(data)
    except ValueError:
        return
    try:
        reference = state_pb2.StateChunk.FromString(data)
    except DecodeError:
        if manifest is None:
            raise AssertionError("_parse_chunk accepted a chunk protobuf refuses") from None
        return
    if (offset, bytes(payload)) != (reference.offset, reference.data):
        raise AssertionError("_parse_chunk's offset or data differ from protobuf's")


DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "x")
ITEMSIZE = {name: torch.empty((), dtype=getattr(torch, name)).element_size() for name in DTYPES if name != "x"}


def manifest(data: bytes) -> None:
    """A manifest built from the bytes (structure-aware: every field drawn from them) is refused with ValueError,
    or gives tensors that fit its buffer."""
    fdp = atheris.FuzzedDataProvider(data)
    m = state_pb2.StateManifest(run_id="run", round_id=fdp.ConsumeIntInRange(0, (1 << 64) - 1))
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        dims = [fdp.ConsumeIntInRange(-2, 40) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        dtype = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
        size = math.prod(dims) * ITEMSIZE.get(dtype, 1)
        m.tensors.add(
            name=fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 4)), dtype=dtype, shape=dims,
            # Mostly the size the shape makes, so that the later checks run too.
            nbytes=max(size, 0) if fdp.ConsumeBool() or fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 1 << 16),
        )
    total = sum(t.nbytes for t in m.tensors)
    m.total_bytes = total if fdp.ConsumeBool() or fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 1 << 21)
    m.block_bytes = fdp.PickValueInList([0, 4096, 8192, fdp.ConsumeIntInRange(0, 1 << 31)])
    m.sha256 = fdp.ConsumeBytes(fdp.PickValueInList([32, 32, 0, 31, 33]))
    blocks = -(-m.total_bytes // m.block_bytes) if m.block_bytes else 0
    count = blocks if fdp.ConsumeBool() or fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 8)
    for k in range(min(count, 600)):
        m.block_sha256.append(m.sha256 if count == 1 else bytes([k % 256]) * fdp.PickValueInList([32, 32, 31]))
    m.meta_json = fdp.PickValueInList(["{}", fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64))])
    try:
        layout = _check_manifest(m, "run", SMALL)
    except ValueError:
        return
    tensors = _Receiver(layout).tensors(layout.entries)
    for e in layout.entries:
        if tensors[e.name].numel() * tensors[e.name].element_size() != e.nbytes:
            raise AssertionError(f"tensor {e.name!r} does not have its announced size")


TARGETS = {"wire": wire, "statechunk": statechunk, "manifest": manifest}


def main(argv: list[str]) -> None:
    """Fuzz the target named by argv[1]; the rest of argv goes to libFuzzer."""
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
