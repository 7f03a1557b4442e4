"""The tar writer of the shard stage: GNU tar members with fixed header fields, hashed as written.

The bytes are those `tarfile` writes for mode 644, uid/gid 0, mtime 0 and no user names (GNU tar
extracts them as they are), produced without tarfile's general machinery, which would dominate a
pass-through run's time. `ShardTarWriter` is what `pipeline.run.write_shard` writes a shard with.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import sys
import tarfile
import threading


def tar_member_bytes(name_len: int, size: int) -> int:
    """Bytes a GNU tar member takes: header, long-name blocks if the name is > 100 chars, data."""
    blocks = 512 + -(-size // 512) * 512
    if name_len > 100:
        blocks += 512 + -(-(name_len + 1) // 512) * 512
    return blocks



# tarfile ends an archive with two zero blocks and pads it to a 20-block record.
TAR_END_BOUND = 1024 + tarfile.RECORDSIZE



def _header_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.GNU_FORMAT)


_HEADER = _header_template()  # the fixed fields: mode 644, uid/gid 0, mtime 0, no user names
_MODE_UID_GID, _MTIME_FIELD, _HEADER_TAIL = _HEADER[100:124], _HEADER[136:148], _HEADER[156:]
# Checksum of the template with an empty name, size field zeros and the checksum field as spaces:
# a header's checksum is this plus the byte sums of its name and size fields.
_HEADER_SUM = sum(_MODE_UID_GID) + sum(_MTIME_FIELD) + 8 * 32 + sum(_HEADER_TAIL)
_PADDING = [bytes(n) for n in range(512)]  # zeros that round a member up to 512-byte blocks


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header of a regular file with the fixed fields; same bytes as
    `tarfile` writes, built without its general machinery (which dominates pass-through time)."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:  # long names, members > 8 GB: tarfile's GNU extensions
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.GNU_FORMAT)
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_HEADER_SUM + sum(raw) + sum(size_field))
    return b"".join((raw.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME_FIELD, checksum, _HEADER_TAIL))


class ShardTarWriter:
    """Writes samples as a tar with fixed header fields to an open file, hashing as it goes.

    Use as a context manager; `add([(name, data), ...])` per sample, then `close()` (end blocks,
    padding to a 10 KiB record, as tarfile and GNU tar do); `sha256` and `num_bytes` then describe
    the whole file. Samples are gathered into chunks of about `chunk_bytes`; with `background`
    a thread joins, writes and hashes each chunk (all three release the GIL) while the caller
    reads the next samples: one process then keeps about 1.5 cores busy. One hand-over per sample
    would cost more than the copy. Without `background` the caller does it: where several writer
    processes already share the cores (--workers N), a second thread per process only adds
    switching. With `writeback_every` (bytes), the kernel is asked to start writing the file to
    disk every so often (without waiting, as RocksDB's bytes_per_sync does), so the caller's
    final fsync has little left to wait for.
    """

    def __init__(self, f, *, chunk_bytes: int = 1 << 20, writeback_every: int | None = None,
                 background: bool = True, depth: int = 8):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0
        self._chunk: list[bytes] = []
        self._chunk_size = 0
        self._chunk_bytes = chunk_bytes
        self._writeback_every = writeback_every
        self._unsynced = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._drain, name="shard-sink", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def _write(self, pieces: list[bytes]) -> None:
        chunk = b"".join(pieces)
        self._f.write(chunk)
        self.sha256.update(chunk)
        self._unsynced += len(chunk)
        if self._writeback_every and self._unsynced >= self._writeback_every:
            self._f.flush()
            start_writeback(self._f.fileno())
            self._unsynced = 0

    def _drain(self) -> None:
        while (pieces := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(pieces)
                except BaseException as e:  # noqa: BLE001 - re-raised in the writing thread
                    self._error = e

    def _flush_chunk(self) -> None:
        if self._error is not None:
            raise self._error
        if self._chunk:
            if self._thread is None:
                self._write(self._chunk)
            else:
                self._queue.put(self._chunk)
            self._chunk, self._chunk_size = [], 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members (name, bytes), in order."""
        for name, data in members:
            size = len(data)
            header, pad = tar_header(name, size), _PADDING[-size % 512]
            self._chunk += (header, data, pad)
            n = len(header) + size + len(pad)
            self._chunk_size += n
            self.num_bytes += n
        if self._chunk_size >= self._chunk_bytes:
            self._flush_chunk()

    def close(self) -> None:
        end = 1024 + -(self.num_bytes + 1024) % tarfile.RECORDSIZE
        self._chunk.append(bytes(end))
        self.num_bytes += end
        self._flush_chunk()
        self._stop()
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> "ShardTarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._stop()


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk without waiting (Linux `sync_file_range`); a
    no-op elsewhere. Durability still comes from the fsync at the end; this only spreads the
    disk writes over the run, so that fsync does not stall it."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # an error only means no head start


