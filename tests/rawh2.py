"""A bare HTTP/2 client for one gRPC call, to send what grpc's own client refuses to.

grpc's client will not send a metadata value that is not printable ASCII, so a test that
needs one (a key followed by a stray byte) writes the frames itself: the connection
preface, SETTINGS, one HEADERS frame of literal, unindexed, non-Huffman fields (RFC 7541
§6.2.2), and an empty gRPC message. It reads frames until the call's trailers.
"""

from __future__ import annotations

import asyncio
import re
import struct

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0, 1, 3, 4, 7
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
_STATUS = re.compile(rb"grpc-status(.)(\d+)", re.DOTALL)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return header + payload


def _integer(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 §5.1), the Huffman bit clear."""
    if value < 127:
        return bytes([value])
    out = bytearray([127])
    value -= 127
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    return b"\x00" + _integer(len(name)) + name + _integer(len(value)) + value


async def grpc_status(port: int, method: str, metadata: list[tuple[bytes, bytes]]) -> int | None:
    """Call ``method`` on 127.0.0.1:``port`` with raw ``metadata``; the grpc-status answered.

    None when the call ended without a status (reset, or the connection closed).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", method.encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    block = b"".join(_literal(name, value) for name, value in fields)
    writer.write(_PREFACE + _frame(_SETTINGS, 0, 0))
    writer.write(_frame(_HEADERS, _END_HEADERS, 1, block))
    writer.write(_frame(_DATA, _END_STREAM, 1, b"\x00\x00\x00\x00\x00"))
    try:
        await writer.drain()
        return await asyncio.wait_for(_read_status(reader, writer), 10)
    finally:
        writer.close()


async def _read_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
    while True:
        try:
            head = await reader.readexactly(9)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        if kind == _SETTINGS and not flags & _ACK:
            writer.write(_frame(_SETTINGS, _ACK, 0))
            await writer.drain()
        elif kind == _GOAWAY or (stream == 1 and kind == _RST_STREAM):
            return None
        elif stream == 1 and kind == _HEADERS and flags & _END_STREAM:
            # grpc sends its trailers as literal fields without Huffman coding.
            found = _STATUS.search(payload)
            if found is None or found.group(1)[0] != len(found.group(2)):
                return None
            return int(found.group(2))
