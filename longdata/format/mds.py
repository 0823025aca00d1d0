"""The one MDS reader for tools: rows of one stream, read directly, without importing
``streaming`` (which imports torch, seconds on a laptop) and without leaving decompressed shards
beside the build (streaming's own readers do).

``StreamReader(stream_dir).row(n)`` opens only the shard holding row ``n`` (found from the
``samples`` counts in index.json); ``load_shard`` checks a shard's size and hashes against the
index before and after decompression; ``check_stream_files`` checks every shard file a reader
would open (the trainer calls it before training). Shard names from index.json are joined to the
stream directory through ``inside``, so an edited index cannot point a reader elsewhere.

``MDSWriter`` and ``merge_index`` write what streaming 0.13 writes, byte for byte (MDS format
version 2, ``ndarray:<dtype>`` columns), so a build stays readable by streaming without longdata
importing it. The reader distrusts what it reads: ``load_shard`` refuses a shard whose columns are
not the row schema (``check_columns``) or whose index records no hash, before decoding anything.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from longdata.format.manifest import BuildFormatError
from longdata.format.paths import UnsafePathError, inside
from longdata.format.rows import COLUMNS

INDEX_FILE = "index.json"


class ShardError(BuildFormatError):
    """A stream or shard that cannot be read as its index.json describes it."""


def read_index(stream_dir: Path) -> list[dict]:
    """The shard entries of ``stream_dir/index.json``; ShardError if it is missing or damaged."""
    path = Path(stream_dir) / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"{path}: missing")
    try:
        shards = json.loads(path.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise ShardError(f"{path}: not a readable MDS index ({error})") from None
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ShardError(f"{path}: 'shards' must be a list of objects")
    return shards


def shard_file(stream_dir: Path, info: dict) -> Path:
    """The file one ``raw_data`` / ``zip_data`` entry names, checked to be inside the stream."""
    try:
        return inside(stream_dir, info["basename"])
    except (UnsafePathError, KeyError, TypeError) as error:
        raise ShardError(f"{stream_dir}/{INDEX_FILE}: bad shard name ({error})") from None


def _decompress(compression: str, data: bytes) -> bytes:
    family = compression.split(":")[0]
    if family == "zstd":
        import zstd

        return zstd.decompress(data)
    if family == "gz":
        import gzip

        return gzip.decompress(data)
    if family == "bz2":
        import bz2

        return bz2.decompress(data)
    if family == "br":
        import brotli

        return brotli.decompress(data)
    if family == "snappy":
        import snappy

        return snappy.decompress(data)
    raise ShardError(f"unknown compression {compression!r}")


def _hash(algorithm: str, data: bytes) -> str:
    if algorithm.startswith("xxh"):
        import xxhash

        return getattr(xxhash, algorithm)(data).hexdigest()
    return hashlib.new(algorithm, data).hexdigest()


def _check(data: bytes, expected: dict, where: Path, require_hash: bool = False) -> None:
    if len(data) != expected["bytes"]:
        raise ShardError(f"{where}: {len(data)} bytes, index says {expected['bytes']}")
    hashes = expected.get("hashes") or {}
    if require_hash and not hashes:
        raise ShardError(
            f"{where}: index.json records no hash for this shard, so it cannot be "
            "checked (longdata builds record xxh64)"
        )
    for algorithm, digest in hashes.items():
        if _hash(algorithm, data) != digest:
            raise ShardError(f"{where}: {algorithm} hash mismatch (corrupted shard)")


def read_shard_file(where: Path) -> bytes:
    """The bytes of one shard file, refusing one that is not a regular file in one line: reading
    a FIFO blocks until a writer appears and /dev/zero never ends. The file is opened without
    blocking and checked through its descriptor, so it cannot be swapped in between."""
    try:
        descriptor = os.open(where, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ShardError(f"{where}: missing shard file") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ShardError(
                f"{where}: not a regular file (a FIFO, device or directory); refusing to read it"
            )
        return handle.read()


def check_stream_files(stream_dir: Path) -> int:
    """Check the size and recorded hash of every shard file of a stream that a reader would
    open: the raw shard where one lies beside the build (streaming reads it first), else the
    compressed one. Returns the number of shards; ShardError names the first bad file."""
    shards = read_index(stream_dir)
    for shard in shards:
        raw = shard_file(stream_dir, shard["raw_data"])
        stored = shard.get("zip_data")
        if raw.exists() or not stored:
            _check(read_shard_file(raw), shard["raw_data"], raw, require_hash=True)
        if stored:
            packed = shard_file(stream_dir, stored)
            if packed.exists() or not raw.exists():
                _check(read_shard_file(packed), stored, packed, require_hash=True)
    return len(shards)


def check_columns(shard: dict, where: Path) -> None:
    """Refuse a shard whose columns are not exactly the row schema's, before anything of it is
    decoded: MDS also has ``pkl``/``json`` encodings, and a planted pickle column would run code
    in any reader that decoded it."""
    columns = list(zip(shard.get("column_names") or [], shard.get("column_encodings") or []))
    if columns != sorted(COLUMNS.items()):
        raise ShardError(
            f"{where}: columns {columns} are not longdata's row schema {sorted(COLUMNS.items())}"
        )


def load_shard(stream_dir: Path, shard: dict) -> bytes:
    """The raw (decompressed) bytes of one shard of ``index.json``, checked against the row
    schema, its sizes and its (required) hashes; ``ShardError`` names the file and what is
    wrong."""
    stored = shard["zip_data"] or shard["raw_data"]
    where = shard_file(Path(stream_dir), stored)
    check_columns(shard, where)
    data = read_shard_file(where)
    _check(data, stored, where, require_hash=True)
    if shard["zip_data"]:
        data = _decompress(shard["compression"], data)
        _check(data, shard["raw_data"], where, require_hash=True)
    return data


def decode_row(raw: bytes, shard: dict, index: int) -> dict[str, np.ndarray]:
    """Row ``index`` of a raw MDS shard: ``[n][n+1 offsets][rows]``; a row is the byte sizes of
    its variable-size columns, then the columns in ``column_names`` order."""
    if shard.get("format") != "mds" or shard.get("version") != 2:
        raise ShardError(f"unsupported shard format {shard.get('format')} v{shard.get('version')}")
    count = int(np.frombuffer(raw, np.uint32, 1)[0])
    if not 0 <= index < count:
        raise IndexError(f"row {index} of a shard with {count} rows")
    begin, end = np.frombuffer(raw, np.uint32, 2, offset=4 * (1 + index)).tolist()
    data = memoryview(raw)[begin:end]
    names, encodings, fixed = (
        shard["column_names"],
        shard["column_encodings"],
        shard["column_sizes"],
    )
    variable = sum(size is None for size in fixed)
    sizes = iter(np.frombuffer(data, np.uint32, variable).tolist())
    position = 4 * variable
    row = {}
    for name, encoding, size in zip(names, encodings, fixed):
        size = next(sizes) if size is None else size
        row[name] = _decode_column(encoding, data[position : position + size], name)
        position += size
    return row


def _decode_column(encoding: str, data: memoryview, name: str) -> np.ndarray:
    """``ndarray:<dtype>`` with a dynamic shape: ``[ndim << 2 | shape dtype][shape][values]``."""
    parts = encoding.split(":")
    if parts[0] != "ndarray" or len(parts) != 2:
        raise ShardError(f"column {name}: encoding {encoding!r} is not one longdata writes")
    header = data[0]
    ndim, shape_dtype = header >> 2, ("uint8", "uint16", "uint32", "uint64")[header % 4]
    shape_bytes = ndim * np.dtype(shape_dtype).itemsize
    shape = tuple(np.frombuffer(data, shape_dtype, ndim, offset=1).tolist())
    return np.frombuffer(data, parts[1], offset=1 + shape_bytes).reshape(shape)


class StreamReader:
    """Random access to the rows of one MDS stream (a directory holding index.json)."""

    def __init__(self, stream_dir: str | Path):
        self.stream_dir = Path(stream_dir)
        self.shards: list[dict] = read_index(self.stream_dir)
        self._ends = np.cumsum([shard["samples"] for shard in self.shards]).tolist()
        self._cached: tuple[int, bytes] | None = None

    @property
    def rows(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, row: int) -> tuple[int, int]:
        """(shard number, row inside that shard) of the stream's row ``row``."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range: the stream has {self.rows} rows")
        shard = bisect.bisect_right(self._ends, row)
        return shard, row - (self._ends[shard - 1] if shard else 0)

    def row(self, row: int) -> dict[str, np.ndarray]:
        shard, index = self.locate(row)
        if self._cached is None or self._cached[0] != shard:
            self._cached = (shard, load_shard(self.stream_dir, self.shards[shard]))
        return decode_row(self._cached[1], self.shards[shard], index)

    def shard_path(self, row: int) -> Path:
        shard = self.shards[self.locate(row)[0]]
        return shard_file(self.stream_dir, shard["zip_data"] or shard["raw_data"])


def _compress(compression: str, data: bytes) -> bytes:
    """``<family>[:<level>]`` as streaming 0.13 names it; its default levels, so shards match."""
    family, _, level = compression.partition(":")
    if family == "zstd":
        import zstd

        return zstd.compress(data, int(level) if level else 3)
    if family in ("gz", "bz2"):
        import bz2
        import gzip

        return (gzip if family == "gz" else bz2).compress(data, int(level) if level else 9)
    raise ShardError(f"compression {compression!r}: longdata writes zstd, gz or bz2")


def encode_column(encoding: str, value: np.ndarray) -> bytes:
    """``ndarray:<dtype>`` with a dynamic shape, the smallest unsigned shape dtype that fits."""
    dtype = encoding.split(":")[1]
    if value.dtype != np.dtype(dtype):
        raise ShardError(f"wrong dtype: expected {dtype}, got {value.dtype.name}")
    if value.size == 0:
        raise ShardError("an MDS ndarray column cannot be empty")
    shape = np.array(value.shape, np.int64)
    shape_code = next(i for i, bits in enumerate((8, 16, 32, 64)) if shape.max() < 1 << bits)
    header = bytes([(len(shape) << 2) | shape_code])
    return header + shape.astype(f"uint{8 << shape_code}").tobytes() + value.tobytes()


class MDSWriter:
    """Writes rows as MDS v2 shards plus index.json, byte for byte as streaming 0.13 does."""

    def __init__(
        self,
        *,
        out: str | Path,
        columns: dict[str, str],
        compression: str | None = None,
        hashes: list[str] | None = None,
        size_limit: int | None = 1 << 26,
    ):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = sorted(columns)
        self.encodings = [columns[name] for name in self.names]
        # Normalised as streaming normalises them, since they are recorded in every shard.
        compression, size_limit = compression or None, size_limit or None
        self.compression, self.hashes, self.size_limit = compression, hashes or [], size_limit
        config = {
            "version": 2,
            "format": "mds",
            "compression": compression,
            "hashes": self.hashes,
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": self.encodings,
            "column_sizes": [None] * len(self.names),
        }
        self.config = config
        self.config_data = json.dumps(config, sort_keys=True).encode("utf-8")
        self.shards: list[dict] = []
        self.rows: list[bytes] = []
        # streaming counts each row's 4-byte offset and the shard header against the limit.
        self.shard_size = 8 + len(self.config_data)

    def write(self, row: dict[str, np.ndarray]) -> None:
        sizes, data = [], []
        for name, encoding in zip(self.names, self.encodings):
            datum = encode_column(encoding, row[name])
            sizes.append(len(datum))
            data.append(datum)
        encoded = np.array(sizes, np.uint32).tobytes() + b"".join(data)
        if self.size_limit and self.size_limit < self.shard_size + len(encoded) + 4:
            self.flush()
        self.rows.append(encoded)
        self.shard_size += len(encoded) + 4

    def _file(self, data: bytes, basename: str) -> dict:
        hashes = {algorithm: _hash(algorithm, data) for algorithm in self.hashes}
        return {"basename": basename, "bytes": len(data), "hashes": hashes}

    def flush(self) -> None:
        count = np.uint32(len(self.rows))
        offsets = np.array([0] + [len(r) for r in self.rows]).cumsum().astype(np.uint32)
        offsets += 4 + offsets.nbytes + len(self.config_data)
        raw = count.tobytes() + offsets.tobytes() + self.config_data + b"".join(self.rows)
        raw_name = f"shard.{len(self.shards):05}.mds"
        raw_info, zip_info, stored = self._file(raw, raw_name), None, (raw, raw_name)
        if self.compression:
            packed = _compress(self.compression, raw)
            zip_info = self._file(packed, f"{raw_name}.{self.compression.split(':')[0]}")
            stored = (packed, zip_info["basename"])
        (self.out / stored[1]).write_bytes(stored[0])
        self.shards.append(
            {"samples": len(self.rows), "raw_data": raw_info, "zip_data": zip_info, **self.config}
        )
        self.rows = []
        self.shard_size = 8 + len(self.config_data)

    def finish(self) -> None:
        if self.rows:
            self.flush()
        with open(self.out / INDEX_FILE, "w") as out:
            json.dump({"version": 2, "shards": self.shards}, out, sort_keys=True)

    def __enter__(self) -> MDSWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finish()


def merge_index(part_indexes: list[str | Path], out: str | Path) -> None:
    """Join the index.json of part directories into ``out/index.json``, each shard's file names
    prefixed with its part directory's name, as streaming 0.13's ``merge_index`` writes it."""
    shards = []
    for part_index in part_indexes:
        part = Path(part_index).parent.name
        for shard in json.loads(Path(part_index).read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part}/{shard[key]['basename']}"
            shards.append(shard)
    with open(Path(out) / INDEX_FILE, "w") as outfile:
        json.dump({"version": 2, "shards": shards}, outfile)
