"""Tokenize stage: conversations -> an on-disk Arrow cache of (tokens, loss mask, length, ...).

The cache is an Arrow IPC file read back memory-mapped, so later stages hold only lengths in
memory and gather a row's tokens straight from the page cache. One cache entry per source,
keyed by everything that changes its tokens (see ``longdata.pipeline.cache_key``), so changing mix
weights, buckets or max length never re-tokenizes.
"""

from __future__ import annotations

import array
import hashlib
import json
import mmap
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from longdata.records import Conversation, Quarantined
from longdata.templates import ByteLevelMasker, ChatRenderer, RenderedChat, assistant_mask

CACHE_FILE = "tokens.arrow"
QUARANTINE_FILE = "quarantine.jsonl"
STATS_FILE = "stats.json"
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.uint32())),
    ("loss_mask", pa.list_(pa.uint8())),
    ("target_tokens", pa.int32()),
    ("lang", pa.string()),
    ("text_hash", pa.uint64()),
    ("location", pa.string()),
    ("position", pa.int64()),
])
BATCH_CHARS = 4_000_000
BATCH_RECORDS = 512
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LANGUAGE_SAMPLE_CHARS = 8_000
# Readers gather from anywhere in a memory-mapped cache; after serving this many tokens its pages
# are released, so RSS stays flat however large the dataset is.
RELEASE_PAGES_EVERY_TOKENS = 8 << 20
# The array module names C types, not widths: pick the one that is 32 bits here.
_UINT32_TYPECODE = next(code for code in "IL" if array.array(code).itemsize == 4)


@dataclass
class TokenizeStats:
    rows_read: int = 0
    quarantined: int = 0
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    no_target_after_tokenize: int = 0
    offsets_fallbacks: int = 0  # samples a normaliser rewrote: masked from real offsets
    seconds: float = 0.0


def detect_language(messages) -> str:
    """``zh`` when CJK characters dominate a sample of the conversation's text, else ``en``."""
    text = "".join(m.content for m in messages)
    if len(text) > 2 * LANGUAGE_SAMPLE_CHARS:
        middle = len(text) // 2
        text = text[:LANGUAGE_SAMPLE_CHARS] + text[middle : middle + LANGUAGE_SAMPLE_CHARS]
    # str.split() splits on exactly the characters str.isspace() accepts, and counts in C.
    letters = sum(map(len, text.split()))
    return "zh" if letters and len(_CJK.findall(text)) >= 0.25 * letters else "en"


def tokenize_records(
    records: Iterable[Conversation | Quarantined],
    tokenizer,
    out_dir: Path,
    *,
    max_samples: int | None = None,
    on_progress: Callable[[int, int], None] = lambda records, tokens: None,
) -> TokenizeStats:
    """Tokenize every record into ``out_dir`` (cache file, quarantine file, stats).

    ``encode_batch`` runs in a worker thread: it releases the GIL and spreads over every core, so
    reading and rendering the next batch and converting the previous one overlap with it. Batches
    are still written strictly in input order, so the cache is identical to a sequential run.
    """
    started = time.perf_counter()
    renderer = ChatRenderer(tokenizer)
    backend = tokenizer.backend_tokenizer
    masker = ByteLevelMasker.for_tokenizer(tokenizer)
    # Without offsets when the mask can do without them (see ByteLevelMasker): the cost floor.
    encode_batch = backend.encode_batch_fast if masker else backend.encode_batch
    stats = TokenizeStats()
    masking = _Masking(backend, masker, stats)
    out_dir.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(out_dir / CACHE_FILE), "wb") as sink, \
            pa.ipc.new_file(sink, SCHEMA) as writer, \
            (out_dir / QUARANTINE_FILE).open("w", encoding="utf-8") as quarantine, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder:

        def write(batch: _Batch, rendered: list[RenderedChat], encoding: Future) -> None:
            for record in batch.quarantined:
                _quarantine(quarantine, record, stats)
            encodings = encoding.result()
            table = _to_arrow(batch.conversations, rendered, encodings, masking, stats, quarantine)
            if table.num_rows:
                writer.write_table(table)
            on_progress(len(batch.conversations), sum(len(e) for e in encodings))

        in_flight = None
        for batch in _batches(records, stats, max_samples):
            rendered = [renderer.render(c.messages) for c in batch.conversations]
            encoding = encoder.submit(encode_batch, [r.text for r in rendered],
                                      add_special_tokens=False)
            if in_flight:
                write(*in_flight)
            in_flight = batch, rendered, encoding
        if in_flight:
            write(*in_flight)
    stats.seconds = time.perf_counter() - started
    (out_dir / STATS_FILE).write_text(json.dumps(asdict(stats), indent=1))
    return stats


@dataclass
class _Batch:
    conversations: list[Conversation] = field(default_factory=list)
    # Rows the reader quarantined while this batch filled, written before the batch's own.
    quarantined: list[Quarantined] = field(default_factory=list)


def _batches(records, stats: TokenizeStats, max_samples) -> Iterator[_Batch]:
    batch = _Batch()
    chars = taken = 0
    for record in records:
        if isinstance(record, Quarantined):
            stats.rows_read += 1
            batch.quarantined.append(record)
            continue
        if max_samples is not None and taken >= max_samples:
            break
        stats.rows_read += 1
        taken += 1
        batch.conversations.append(record)
        chars += sum(len(m.content) for m in record.messages)
        if chars >= BATCH_CHARS or len(batch.conversations) >= BATCH_RECORDS:
            yield batch
            batch, chars = _Batch(), 0
    if batch.conversations or batch.quarantined:
        yield batch


def _quarantine(handle, record: Quarantined, stats: TokenizeStats) -> None:
    stats.quarantined += 1
    handle.write(json.dumps({"location": record.location, "reason": record.reason,
                             "raw": record.raw}, ensure_ascii=False) + "\n")


@dataclass
class _Masking:
    backend: Any  # tokenizers.Tokenizer
    masker: ByteLevelMasker | None
    stats: TokenizeStats

    def mask(self, encoding, ids: np.ndarray, chat: RenderedChat) -> np.ndarray:
        if self.masker is not None:
            mask = self.masker.mask(ids, chat.text, chat.assistant_spans)
            if mask is not None:
                return mask
            # A normaliser rewrote this text: only real offsets locate its spans.
            self.stats.offsets_fallbacks += 1
            encoding = self.backend.encode(chat.text, add_special_tokens=False)
        return assistant_mask(encoding, chat.assistant_spans, len(ids))


def _to_arrow(batch: list[Conversation], rendered: list[RenderedChat], encodings, masking: _Masking,
              stats: TokenizeStats, quarantine) -> pa.Table:
    # All ids of the batch go into one C array: ``array.extend`` converts the Python ints of
    # ``encoding.ids`` several times faster than ``np.asarray`` does, and no concatenate follows.
    ids = array.array(_UINT32_TYPECODE)
    lengths, masks, targets, langs, hashes, locations, positions = [], [], [], [], [], [], []
    for conversation, chat, encoding in zip(batch, rendered, encodings):
        n_tokens = len(encoding)
        ids.extend(encoding.ids)
        mask = masking.mask(encoding, np.frombuffer(ids, dtype=np.uint32)[len(ids) - n_tokens:], chat)
        target_tokens = int(mask.sum())
        if target_tokens == 0:
            # Only possible when a template drops assistant text; keep the row visible.
            del ids[len(ids) - n_tokens:]
            stats.no_target_after_tokenize += 1
            _quarantine(quarantine, Quarantined(conversation.location,
                        "no assistant token left after applying the chat template", chat.text[:2000]), stats)
            continue
        lengths.append(n_tokens)
        masks.append(mask)
        targets.append(target_tokens)
        langs.append(detect_language(conversation.messages))
        hashes.append(int.from_bytes(hashlib.blake2b(chat.text.encode("utf-8", "surrogatepass"),
                                                     digest_size=8).digest(), "little"))
        locations.append(conversation.location)
        positions.append(conversation.position)
        stats.samples += 1
        stats.tokens += n_tokens
        stats.target_tokens += target_tokens
    return pa.table({
        "input_ids": _list_array(np.frombuffer(ids, dtype=np.uint32), lengths, pa.uint32()),
        "loss_mask": _list_array(np.concatenate(masks) if masks else np.zeros(0, np.uint8),
                                 lengths, pa.uint8()),
        "target_tokens": pa.array(targets, pa.int32()),
        "lang": pa.array(langs, pa.string()),
        "text_hash": pa.array(hashes, pa.uint64()),
        "location": pa.array(locations, pa.string()),
        "position": pa.array(positions, pa.int64()),
    }, schema=SCHEMA)


def _list_array(values: np.ndarray, lengths: list[int], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


class TokenCache:
    """Read side of one cache entry: per-sample metadata in memory, tokens memory-mapped."""

    def __init__(self, entry_dir: Path):
        # Mapped with the mmap module rather than pa.memory_map so release_pages can madvise it.
        with (entry_dir / CACHE_FILE).open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        table = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._map))).read_all()
        self._chunks = []
        starts = [0]
        for ids, mask in zip(table.column("input_ids").chunks, table.column("loss_mask").chunks):
            offsets = ids.offsets.to_numpy()
            self._chunks.append((offsets, ids.values.to_numpy(), mask.values.to_numpy()))
            starts.append(starts[-1] + len(ids))
        self._chunk_starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.concatenate(
            [np.diff(offsets) for offsets, _, _ in self._chunks]).astype(np.int64) \
            if self._chunks else np.zeros(0, dtype=np.int64)
        self.target_tokens = table.column("target_tokens").to_numpy().astype(np.int64)
        self.lang = np.asarray(table.column("lang").to_pylist(), dtype=object)
        self.text_hash = table.column("text_hash").to_numpy()
        self.position = table.column("position").to_numpy()
        self.stats = TokenizeStats(**json.loads((entry_dir / STATS_FILE).read_text()))
        self.quarantine_files = [entry_dir / QUARANTINE_FILE]
        self._tokens_since_release = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def release_pages(self) -> None:
        """Unmap the resident pages of the cache from this process (they stay in the page cache,
        so touching them again is a cheap soft fault). Pages a reader touched otherwise count as
        this process's RSS until it exits, which would make RSS grow with the dataset."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def tokens(self, sample: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-copy views of ``length`` tokens (and their mask) of ``sample`` from ``start``."""
        chunk = int(np.searchsorted(self._chunk_starts, sample, side="right")) - 1
        offsets, ids, mask = self._chunks[chunk]
        self._tokens_since_release += length
        if self._tokens_since_release >= RELEASE_PAGES_EVERY_TOKENS:
            self.release_pages()  # views handed out earlier stay valid: they just fault back in
            self._tokens_since_release = 0
        begin = int(offsets[sample - self._chunk_starts[chunk]]) + start
        return ids[begin : begin + length], mask[begin : begin + length]


class PartitionedCache:
    """The caches of one source's shares (a partitioned build) seen as one cache, samples in
    source position order: exactly the order a single-process build of the source has."""

    def __init__(self, parts: list[TokenCache]):
        self._parts = parts
        order = np.argsort(np.concatenate([p.position for p in parts]), kind="stable")
        self._part = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])[order]
        self._local = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])[order]
        for name in ("lengths", "target_tokens", "lang", "text_hash", "position"):
            setattr(self, name, np.concatenate([getattr(p, name) for p in parts])[order])
        totals = {f: sum(getattr(p.stats, f) for p in parts) for f in TokenizeStats.__dataclass_fields__}
        self.stats = TokenizeStats(**totals)
        self.quarantine_files = [f for p in parts for f in p.quarantine_files]

    def __len__(self) -> int:
        return len(self.lengths)

    def release_pages(self) -> None:
        for part in self._parts:
            part.release_pages()

    def tokens(self, sample: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self._parts[self._part[sample]].tokens(int(self._local[sample]), start, length)
