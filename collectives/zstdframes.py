"""Reading one zstd frame that came from the network: its header is checked before anything is allocated.

``ZstdDecompressor.decompress`` allocates the content size a frame declares, and a frame of a few bytes can
declare gigabytes. So a frame is read only if it declares a size the caller allows and carries a checksum;
it must then decompress to exactly that size, with nothing after it. The codecs' ``+zstd`` payloads and the
coordinator's packed member lists are read this way.
"""

from __future__ import annotations

import zstandard


class BadFrame(ValueError):
    """Bytes that are not one sound zstd frame of an allowed size (the message says which check failed)."""


def read_frame(payload: bytes | memoryview, allowed: range, dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
    """The content of the one zstd frame in payload (bytes or a buffer), whose declared size must be in allowed;
    BadFrame when it is not a frame, declares no size or another one, has no checksum, or is corrupt."""
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise BadFrame(f"payload is not a zstd frame: {exc}") from None
    size = params.content_size  # CONTENTSIZE_UNKNOWN and _ERROR are in no allowed range
    if size not in allowed:
        declared = "no content size" if size >= zstandard.CONTENTSIZE_ERROR else f"{size} bytes"
        wanted = str(allowed.start) if len(allowed) == 1 else f"{allowed.start} to {allowed.stop - 1}"
        raise BadFrame(f"zstd frame declares {declared}, expected {wanted} bytes")
    if not params.has_checksum:
        raise BadFrame("zstd frame has no checksum; loconet frames always carry one")
    try:
        data = (dctx or zstandard.ZstdDecompressor()).decompress(
            payload, max_output_size=max(size, 1), allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise BadFrame(f"corrupt zstd frame: {exc}") from None
    if len(data) != size:
        raise BadFrame(f"zstd frame decompressed to {len(data)} bytes, expected {size}")
    return data
