"""Byte streams of input files: counted for progress bars, decompressed (.gz, .zst), and UTF-16/32 text
turned into UTF-8, so every reader sees one kind of stream.

Damage is raised, never swallowed: a cut archive raises EOFError and a corrupt one `DamagedArchive` (an
OSError), which the readers count as an unreadable file after keeping the rows read before it.
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[int], None]  # called with the number of bytes just read from disk

_ZSTD_INPUT = 1 << 15  # compressed bytes fed at a time: bounds what one call decompresses into memory
_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class DamagedArchive(OSError):
    """Compressed data that cannot be decompressed (a corrupt block, not a zstd or gzip stream)."""


# What a damaged input raises while it is read: the readers catch these, keep what came before and
# count the file. zlib.error is what gzip raises for a corrupt deflate block.
READ_ERRORS = (OSError, EOFError, zlib.error)


def describe_error(e: BaseException) -> str:
    """What went wrong reading a file, for the drop's example."""
    if isinstance(e, zlib.error):
        return f"corrupt gzip data: {e}"
    return f"{type(e).__name__}: {e}"


class _Counted(io.RawIOBase):
    """A file that reports how many bytes were read from disk (for progress bars)."""

    def __init__(self, path: Path, progress: Progress | None):
        self.file = io.FileIO(path, "r")
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        if n and self.progress is not None:
            self.progress(n)
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


class _Chunks(io.RawIOBase):
    """A raw stream over a producer of byte chunks (b"" at the end), for io.BufferedReader."""

    def __init__(self, source: io.BufferedIOBase):
        self.source = source
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def next_chunk(self) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self.next_chunk()
            if not chunk:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self.source.close()
        super().close()


class _Zstd(_Chunks):
    """A zstd stream of one or more frames, decompressed frame by frame so that input ending inside a
    frame (a cut download, a full disk) is an error, not a silently shorter file."""

    def __init__(self, source: io.BufferedIOBase):
        import zstandard

        super().__init__(source)
        self._dctx = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._unused = b""  # input past the end of the last frame

    def next_chunk(self) -> bytes:
        while True:
            data, self._unused = (self._unused or self.source.read(_ZSTD_INPUT)), b""
            if not data:
                if self._frame is not None:
                    raise EOFError("the zstd data ends inside a frame: the file is truncated")
                return b""
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                out = self._frame.decompress(data)
            except self._error as e:
                raise DamagedArchive(f"corrupt zstd data: {e}") from None
            if self._frame.eof:
                self._unused, self._frame = self._frame.unused_data, None
            if out:
                return out


_INVALID = "cptkit.invalid-unit"  # undecodable UTF-16/32 units become one invalid UTF-8 byte each
codecs.register_error(_INVALID, lambda e: ("\udcff", e.end))


class _ToUtf8(_Chunks):
    """UTF-16 or UTF-32 text (its byte order mark first) re-encoded as UTF-8 as it is read. An undecodable
    unit becomes the byte 0xFF, which the UTF-8 decoding downstream replaces and counts like any other."""

    def __init__(self, source: io.BufferedIOBase, encoding: str):
        super().__init__(source)
        self._decoder = codecs.getincrementaldecoder(encoding)(_INVALID)
        self._done = False

    def next_chunk(self) -> bytes:
        while not self._done:
            data = self.source.read(1 << 16)
            self._done = not data
            text = self._decoder.decode(data, final=self._done)
            if text:
                return text.encode("utf-8", "surrogateescape")
        return b""


def open_binary(path: Path, compression: str, progress: Progress | None = None) -> io.BufferedIOBase:
    """A binary stream of the file's content, decompressed on the fly."""
    raw = io.BufferedReader(_Counted(path, progress), buffer_size=1 << 20)
    if compression == ".gz":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        stream.myfileobj = raw  # closed with the gzip stream
        return stream
    if compression == ".zst":
        return io.BufferedReader(_Zstd(raw), buffer_size=1 << 16)
    return raw


def text_encoding(head: bytes) -> str | None:
    """'utf-16' or 'utf-32' when `head` starts with that encoding's byte order mark, else None."""
    return next((encoding for bom, encoding in _BOMS if head.startswith(bom)), None)


def open_text_bytes(path: Path, compression: str, progress: Progress | None = None) -> io.BufferedIOBase:
    """The file's text as UTF-8 bytes (a UTF-16/32 file, told by its byte order mark, re-encoded); a
    stream with `peek`, so readers can sniff its start."""
    stream = open_binary(path, compression, progress)
    encoding = text_encoding(stream.peek(4)[:4])
    return io.BufferedReader(_ToUtf8(stream, encoding)) if encoding else stream
