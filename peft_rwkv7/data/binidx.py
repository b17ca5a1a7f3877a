"""Megatron MMIDIDX `.bin/.idx` pairs (the binidx format RWKV-LM and RWKV-PEFT train from).

`.idx` layout, little-endian: magic `b"MMIDIDX\\x00\\x00"`, u64 version (1), u8 dtype code,
u64 n (entries), u64 m (doc_idx length), then int32 sizes[n], int64 pointers[n] (byte offsets
into `.bin`), int64 doc_idx[m]. `.bin` is the entries' tokens back to back. We write one entry per
document (its tokens followed by end-of-text 0) and doc_idx = 0..n, as RWKV's json2binidx does.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import socket
import struct
from pathlib import Path

import numpy as np

from ..errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes (6 and 7 are floats, never token ids).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 when every id fits (World 65530, GPT-NeoX 50277), else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def split_prefix(path: str | os.PathLike) -> str:
    """`x`, `x.bin` or `x.idx` -> `x`."""
    s = str(path)
    return s[:-4] if s.endswith((".bin", ".idx")) else s


def is_binidx(path: str | os.PathLike) -> bool:
    prefix = split_prefix(path)
    return Path(prefix + ".idx").is_file() or Path(prefix + ".bin").is_file()


class MMapIndexedDataset:
    """Read-only memory map of a binidx pair, validated on open (UserError on any inconsistency).

    `tokens`: every token of `.bin` as one flat array [num_tokens] (memmap, not loaded);
    `sizes` [n] int32, `pointers` [n] int64 (bytes), `doc_idx` [m] int64; `ds[i]` = entry i.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.prefix = split_prefix(path)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise UserError(f"{p}: no such file (a binidx dataset needs both PREFIX.bin and PREFIX.idx)")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise UserError(f"{idx_path}: truncated index ({len(raw)} bytes, header alone is {_HEADER.size})")
        magic, version, code, n, m = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise UserError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic {magic!r})")
        if version != VERSION:
            raise UserError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: token dtype code {code} is not an integer type")
        want = _HEADER.size + 12 * n + 8 * m
        if len(raw) != want:
            raise UserError(f"{idx_path}: {len(raw)} bytes but its header describes {want} (truncated index?)")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        off = _HEADER.size
        self.sizes = np.frombuffer(raw, "<i4", n, off)
        self.pointers = np.frombuffer(raw, "<i8", n, off + 4 * n)
        self.doc_idx = np.frombuffer(raw, "<i8", m, off + 12 * n)
        self._check(idx_path, bin_path)
        nbytes = bin_path.stat().st_size
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if nbytes else np.zeros(0, self.dtype)
        )

    def _check(self, idx_path: Path, bin_path: Path) -> None:
        sizes, ptrs, item = self.sizes.astype(np.int64), self.pointers, self.dtype.itemsize
        if (sizes < 0).any():
            raise UserError(f"{idx_path}: negative entry size (corrupt index)")
        # Entries must lie back to back: the samplers read the .bin as one token stream.
        expect = np.concatenate([[0], np.cumsum(sizes * item)])
        if not np.array_equal(ptrs, expect[:-1]):
            bad = int(np.flatnonzero(ptrs != expect[:-1])[0])
            raise UserError(f"{idx_path}: entry {bad} does not start where entry {bad - 1} ends (corrupt index)")
        if len(self.doc_idx) and (self.doc_idx[0] != 0 or self.doc_idx[-1] != len(sizes)
                                  or (np.diff(self.doc_idx) < 0).any()):
            raise UserError(f"{idx_path}: doc_idx does not cover entries 0..{len(sizes)} (corrupt index)")
        have = bin_path.stat().st_size
        if have != int(expect[-1]):
            raise UserError(
                f"{bin_path}: {have} bytes but {idx_path.name} describes {int(expect[-1])} "
                "(truncated or mismatched .bin/.idx pair)"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]


def temp_name(folder: Path, name: str, ext: str) -> str:
    """`.{name}.{host}.{pid}.{8 hex}{ext}.tmp` in `folder`, for ext .bin, .idx or .mask: who made it, so that a
    later writer of the same name can tell a killed writer's file (remove_dead_temps). Not tempfile.mkstemp: its
    files are mode 0600, and the renamed result should follow the umask."""
    return str(folder / f".{name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{ext}.tmp")


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "host"


def remove_dead_temps(folder: Path, name: str) -> None:
    """Delete the temp files of writers of `name` that were killed (SIGKILL, the OOM killer: a .bin temp can hold
    gigabytes): those made on this host by a process that no longer runs. Another host's, on a shared file
    system, are left alone: its processes cannot be seen from here."""
    made = re.compile(rf"\.{re.escape(name)}\.{re.escape(_host())}\.(\d+)\.[0-9a-f]{{8}}\.(bin|idx|mask)\.tmp")
    try:
        found = list(Path(folder).glob(f".{glob.escape(name)}.*.tmp"))
    except OSError:
        return
    for f in found:
        m = made.fullmatch(f.name)
        if m and not _running(int(m.group(1))):
            f.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid no process can have
        return True
    return True


class BinIdxWriter:
    """Streams entries into a temp `.bin`; `finish()` writes the `.idx` and renames both into place.

    Readers never see a half-written or mismatched pair: the old `.idx` is removed before the new
    `.bin` replaces the old one, and the new `.idx` appears last. On any exception (Ctrl-C
    included) `abort()` deletes the temp files and leaves existing files alone.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.integer]) -> None:
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        folder = Path(self.prefix).parent
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(self.prefix).name
        remove_dead_temps(folder, name)
        self._tmp_bin = temp_name(folder, name, ".bin")
        self._bin = open(self._tmp_bin, "xb")
        self._tmp_idx: str | None = None
        self._sizes: list[np.ndarray] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append entries: `tokens` flat, `sizes` [k] their lengths (sum(sizes) == len(tokens))."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._sizes.append(np.asarray(sizes, dtype=np.int32))
        self.num_tokens += len(tokens)

    def finish(self) -> None:
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        counts = sizes.astype(np.int64)
        pointers = (np.cumsum(counts) - counts) * self.dtype.itemsize  # each entry's first byte; none for none
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        code = next(c for c, t in DTYPE_CODES.items() if np.dtype(t).newbyteorder("<") == self.dtype)
        self._tmp_idx = temp_name(Path(self.prefix).parent, Path(self.prefix).name, ".idx")
        with open(self._tmp_idx, "xb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, code, len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        Path(self.prefix + ".idx").unlink(missing_ok=True)
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            if p:
                Path(p).unlink(missing_ok=True)

    def __enter__(self) -> BinIdxWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.finish()
        except BaseException:
            self.abort()
            raise
