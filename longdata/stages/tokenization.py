"""Tokenize stage: conversations and documents -> an on-disk Arrow cache of (tokens, loss mask,
length, ...).

A conversation is rendered with the chat template and only assistant tokens are targets. A raw
document (``kind: text``) has no template: its tokens are the tokenizer's BOS id (when it has a
BOS token), the document's own tokens, then its EOS id (when it has an EOS token; for an
instruct tokenizer that is the end-of-turn token, e.g. Llama 3.1's ``<|eot_id|>``), and every
token but the first is a target. Special ids are added as ids, so a tokenizer whose encoding
adds no BOS of its own still frames every document the same way.

The cache is an Arrow IPC file read back memory-mapped, so later stages hold only lengths in
memory and gather a row's tokens straight from the page cache. One cache entry per source,
keyed by everything that changes its tokens (see ``longdata.pipeline.cache_key``), so changing mix
weights, buckets or max length never re-tokenizes. Each entry records an xxh64 checksum of its
files (``checksums.json``); an entry that no longer matches is not reused.
"""

from __future__ import annotations

import array
import dataclasses
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

from longdata.format.manifest import TokenizeCounts
from longdata.records import EMPTY_CONVERSATION, Conversation, Document, Quarantined
from longdata.stages.control_tokens import SpecialTokenText
from longdata.stages.templates import (
    ByteLevelMasker,
    ChatRenderer,
    RenderedChat,
    TemplateTooSlow,
    assistant_mask,
    inner_tokens,
)

CACHE_FILE = "tokens.arrow"
QUARANTINE_FILE = "quarantine.jsonl"
STATS_FILE = "stats.json"
CHECKSUM_FILE = "checksums.json"
CHECKED_FILES = (CACHE_FILE, STATS_FILE, QUARANTINE_FILE)
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.uint32())),
        ("loss_mask", pa.list_(pa.uint8())),
        ("target_tokens", pa.int32()),
        ("lang", pa.string()),
        ("text_hash", pa.uint64()),
        ("location", pa.string()),
        ("position", pa.int64()),
        # [user_start, user_end): tokens of the longest user turn's content, none of them a target;
        # what truncate_middle cuts from (0, 0 when the sample has none).
        ("user_start", pa.int32()),
        ("user_end", pa.int32()),
    ]
)
BATCH_CHARS = 4_000_000
BATCH_RECORDS = 512
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LANGUAGE_SAMPLE_CHARS = 8_000
_SURROGATE = re.compile("[\ud800-\udfff]")
# Readers gather from anywhere in a memory-mapped cache; after serving this many tokens its pages
# are released, so RSS stays flat however large the dataset is.
RELEASE_PAGES_EVERY_TOKENS = 8 << 20
# The array module names C types, not widths: pick the one that is 32 bits here.
_UINT32_TYPECODE = next(code for code in "IL" if array.array(code).itemsize == 4)


# Per source file: every row read is a sample or quarantined, once a conversation made into one
# sample per assistant turn counts as its samples (rows_read + turn_samples_added == samples +
# quarantined).
FILE_COUNTS = ("rows_read", "turn_samples_added", "quarantined", "samples")


@dataclass
class TokenizeStats(TokenizeCounts):
    """The manifest's counts, and how long tokenizing took (for the build's timings only)."""

    seconds: float = 0.0

    def counts(self) -> TokenizeCounts:
        """The counts alone, as the manifest records them."""
        return TokenizeCounts(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(TokenizeCounts)}
        )

    def count_file(self, file: str, what: str, amount: int = 1) -> None:
        if file:  # generated sources have no files
            counts = self.files.setdefault(file, dict.fromkeys(FILE_COUNTS, 0))
            counts[what] += amount

    @classmethod
    def total(cls, parts: list[TokenizeStats]) -> TokenizeStats:
        totals = cls(
            **{
                f: sum(getattr(p, f) for p in parts)
                for f in cls.__dataclass_fields__
                if f != "files"
            }
        )
        for part in parts:
            for file, counts in part.files.items():
                mine = totals.files.setdefault(file, dict.fromkeys(FILE_COUNTS, 0))
                for what in FILE_COUNTS:
                    mine[what] += counts[what]
        totals.files = dict(sorted(totals.files.items()))
        return totals


def detect_language(messages) -> str:
    """``zh`` when CJK characters dominate a sample of the conversation's text, else ``en``."""
    return detect_text_language("".join(m.content for m in messages))


def detect_text_language(text: str) -> str:
    """``zh`` when CJK characters dominate a sample of ``text``, else ``en``."""
    if len(text) > 2 * LANGUAGE_SAMPLE_CHARS:
        middle = len(text) // 2
        text = text[:LANGUAGE_SAMPLE_CHARS] + text[middle : middle + LANGUAGE_SAMPLE_CHARS]
    # str.split() splits on exactly the characters str.isspace() accepts, and counts in C.
    letters = sum(map(len, text.split()))
    return "zh" if letters and len(_CJK.findall(text)) >= 0.25 * letters else "en"


def tokenize_records(
    records: Iterable[Conversation | Document | Quarantined],
    tokenizer,
    out_dir: Path,
    *,
    multi_turn: str = "auto",
    max_samples: int | None = None,
    on_progress: Callable[[int, int], None] = lambda records, tokens: None,
    special_tokens_in_text: str = "encode_as_text",
) -> TokenizeStats:
    """Tokenize every record into ``out_dir`` (cache file, quarantine file, stats).

    ``encode_batch`` runs in a worker thread: it releases the GIL and spreads over every core, so
    reading and rendering the next batch and converting the previous one overlap with it. Batches
    are still written strictly in input order, so the cache is identical to a sequential run.

    Whatever one row raises while it is rendered, encoded or masked quarantines that row alone
    with the error as its reason. A text spelling a special token is encoded as text unless
    ``special_tokens_in_text`` is ``allow`` (see ``longdata.stages.control_tokens``).
    """
    started = time.perf_counter()
    renderer = ChatRenderer(tokenizer, multi_turn)
    backend = tokenizer.backend_tokenizer
    masker = ByteLevelMasker.for_tokenizer(tokenizer)
    special = SpecialTokenText(backend)
    stats = TokenizeStats()
    masking = _Masking(backend, masker, stats, DocumentFraming.for_tokenizer(tokenizer), special)
    encode_as_text = special_tokens_in_text != "allow"
    out_dir.mkdir(parents=True, exist_ok=True)
    # backslashreplace: a lone surrogate in a quarantined row's text is written as its JSON escape.
    with (
        pa.OSFile(str(out_dir / CACHE_FILE), "wb") as sink,
        pa.ipc.new_file(sink, SCHEMA) as writer,
        (out_dir / QUARANTINE_FILE).open(
            "w", encoding="utf-8", errors="backslashreplace"
        ) as quarantine,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as encoder,
    ):

        def write(batch: _Batch, samples: list[_Sample], encoding: Future) -> None:
            for record in batch.quarantined:
                _quarantine(quarantine, record, stats)
            encodings = encoding.result()
            table = _to_arrow(samples, encodings, masking, stats, quarantine)
            if table.num_rows:
                writer.write_table(table)
            on_progress(
                len(batch.conversations),
                sum(len(e) for e in encodings if not isinstance(e, Exception)),
            )

        in_flight = None
        for batch in _batches(records, stats, max_samples):
            samples = _render(batch, renderer, special, stats, encode_as_text)
            # Without offsets when the mask can do without them (documents never need them;
            # chats with a ByteLevelMasker): the cost floor.
            fast = masker or all(isinstance(chat, Document) for _, chat in samples)
            encode_batch = backend.encode_batch_fast if fast else backend.encode_batch
            encoding = encoder.submit(
                _encode_batch, encode_batch, special, [chat for _, chat in samples]
            )
            if in_flight:
                write(*in_flight)
            in_flight = batch, samples, encoding
        if in_flight:
            write(*in_flight)
    stats.seconds = time.perf_counter() - started
    (out_dir / STATS_FILE).write_text(json.dumps(asdict(stats), indent=1))
    (out_dir / CHECKSUM_FILE).write_text(
        json.dumps({name: _xxh64(out_dir / name) for name in CHECKED_FILES}, indent=1)
    )
    return stats


class CacheEntryError(RuntimeError):
    """A cache entry whose files no longer match their recorded checksums."""

    exit_code = 1


def _xxh64(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh64()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry_problem(entry_dir: Path) -> str | None:
    """Why a cache entry cannot be trusted (a file changed, is missing, or no checksums were
    recorded: an entry older than checksums), or None when every file matches."""
    try:
        recorded = json.loads((entry_dir / CHECKSUM_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return "no readable checksums"
    for name in CHECKED_FILES:
        path = entry_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if not isinstance(recorded, dict) or recorded.get(name) != _xxh64(path):
            return f"{name} does not match its checksum"
    return None


# One sample to encode: the record it came from and its text (a Document is its own text).
_Sample = tuple[Conversation | Document, RenderedChat | Document]


def _render(
    batch: _Batch,
    renderer: ChatRenderer,
    special: SpecialTokenText,
    stats: TokenizeStats,
    encode_as_text: bool,
) -> list[_Sample]:
    """Every sample of the batch with the record it came from: several per conversation where the
    multi-turn policy gives each assistant turn its own sample. A conversation that cannot be
    rendered joins the batch's quarantined rows, with the error as its reason."""
    samples: list[_Sample] = []
    for conversation in batch.conversations:
        if isinstance(conversation, Document):
            samples.append((conversation, conversation))
            continue
        # transformers 5 refuses to template an empty conversation and 4.x renders it: decide
        # before the template is called, so a row's outcome does not depend on the version.
        if not conversation.messages:
            batch.quarantined.append(
                Quarantined(conversation.location, EMPTY_CONVERSATION, "[]", conversation.file)
            )
            continue
        try:
            chats = renderer.samples(conversation.messages)
            if special.spelled_in(conversation.messages):
                if encode_as_text:
                    chats = [
                        dataclasses.replace(
                            chat,
                            spelled_special=special.locate(
                                conversation.messages,
                                chat.text,
                                lambda m, turn=turn: renderer.samples(m)[turn].text,
                            ),
                        )
                        for turn, chat in enumerate(chats)
                    ]
                stats.special_token_text_rows += 1
        except TemplateTooSlow:
            raise  # the template's fault, not the row's: every later row would wait as long
        except (
            Exception
        ) as exc:  # a template or a row can fail in many ways; each is one row's fault
            batch.quarantined.append(
                Quarantined(
                    conversation.location,
                    _row_error("chat template", exc),
                    _preview_messages(conversation),
                    conversation.file,
                )
            )
            continue
        if renderer.multi_turn != "last_turn":
            stats.untrained_turns += sum(
                m.role == "assistant" for m in conversation.messages
            ) - sum(len(chat.assistant_spans) for chat in chats)
        if len(chats) > 1:
            stats.split_conversations += 1
            stats.turn_samples += len(chats)
            stats.count_file(conversation.file, "turn_samples_added", len(chats) - 1)
        samples.extend((conversation, chat) for chat in chats)
    return samples


def _encode_batch(
    encode_batch, special: SpecialTokenText, chats: list[RenderedChat | Document]
) -> list:
    """The batch's encodings, one per chat, or the exception a chat's encoding raised in its place.
    The whole batch is encoded at once; only when that fails is each chat encoded alone."""
    texts = [chat.text for chat in chats]
    try:
        encodings = encode_batch(texts, add_special_tokens=False)
    except Exception:  # e.g. TypeError for a lone surrogate: find the row(s) responsible
        encodings = [_encode_one(encode_batch, text) for text in texts]
    for index, chat in enumerate(chats):
        if getattr(chat, "spelled_special", ()) and not isinstance(encodings[index], Exception):
            try:
                encodings[index] = special.encode(chat.text, chat.spelled_special)
            except Exception as exc:
                encodings[index] = exc
    return encodings


def _encode_one(encode_batch, text: str):
    try:
        return encode_batch([text], add_special_tokens=False)[0]
    except Exception as exc:
        return exc


def _row_error(stage: str, exc: BaseException) -> str:
    return f"{stage} failed on this row: {type(exc).__name__}: {str(exc)[:500]}"


def _preview_messages(conversation: Conversation, limit: int = 2000) -> str:
    return json.dumps(
        [{"role": m.role, "content": m.content[:limit]} for m in conversation.messages],
        ensure_ascii=False,
    )[:limit]


@dataclass
class _Batch:
    conversations: list[Conversation | Document] = field(default_factory=list)
    # Rows the reader quarantined while this batch filled, written before the batch's own.
    quarantined: list[Quarantined] = field(default_factory=list)


def _batches(records, stats: TokenizeStats, max_samples) -> Iterator[_Batch]:
    batch = _Batch()
    chars = taken = 0
    for record in records:
        if isinstance(record, Quarantined):
            stats.rows_read += 1
            stats.count_file(record.file, "rows_read")
            batch.quarantined.append(record)
            continue
        if max_samples is not None and taken >= max_samples:
            break
        stats.rows_read += 1
        stats.count_file(record.file, "rows_read")
        taken += 1
        batch.conversations.append(record)
        chars += (
            len(record.text)
            if isinstance(record, Document)
            else sum(len(m.content) for m in record.messages)
        )
        if chars >= BATCH_CHARS or len(batch.conversations) >= BATCH_RECORDS:
            yield batch
            batch, chars = _Batch(), 0
    if batch.conversations or batch.quarantined:
        yield batch


def _quarantine(handle, record: Quarantined, stats: TokenizeStats) -> None:
    stats.quarantined += 1
    stats.count_file(record.file, "quarantined")
    handle.write(
        json.dumps(
            {"location": record.location, "reason": record.reason, "raw": record.raw},
            ensure_ascii=False,
        )
        + "\n"
    )


@dataclass(frozen=True)
class DocumentFraming:
    """The special ids around every raw document: BOS before, EOS after, each if defined."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer) -> DocumentFraming:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        return cls(() if bos is None else (bos,), () if eos is None else (eos,))


@dataclass
class _Masking:
    backend: Any  # tokenizers.Tokenizer
    masker: ByteLevelMasker | None
    stats: TokenizeStats
    framing: DocumentFraming
    special: SpecialTokenText

    def mask_and_user_tokens(
        self, encoding, ids: np.ndarray, chat: RenderedChat
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """The loss mask and the token range of the sample's cuttable user turn (or (0, 0))."""
        if self.masker is not None:
            ends = self.masker.token_ends(ids, chat.text)
            if ends is not None:
                mask = self.masker.mask_from_ends(ends, chat.text, chat.assistant_spans)
                user = (
                    self.masker.inner_tokens(ids, ends, chat.text, chat.user_span)
                    if chat.user_span
                    else (0, 0)
                )
                return mask, _untargeted(user, mask)
            # A normaliser rewrote this text: only real offsets locate its spans.
            self.stats.offsets_fallbacks += 1
            encoding = (
                self.special.encode(chat.text, chat.spelled_special)
                if chat.spelled_special
                else self.backend.encode(chat.text, add_special_tokens=False)
            )
        mask = assistant_mask(encoding, chat.assistant_spans, len(ids))
        user = inner_tokens(encoding, chat.user_span) if chat.user_span else (0, 0)
        return mask, _untargeted(user, mask)


def _untargeted(tokens: tuple[int, int], mask: np.ndarray) -> tuple[int, int]:
    """``tokens`` if none of them is a target, else (0, 0): a cut there could remove a target."""
    return (0, 0) if mask[tokens[0] : tokens[1]].any() else tokens


def _to_arrow(
    samples: list[_Sample], encodings, masking: _Masking, stats: TokenizeStats, quarantine
) -> pa.Table:
    # All ids of the batch go into one C array: ``array.extend`` converts the Python ints of
    # ``encoding.ids`` several times faster than ``np.asarray`` does, and no concatenate follows.
    ids = array.array(_UINT32_TYPECODE)
    lengths, masks, targets, langs, hashes, locations, positions, users = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    for (record, chat), encoding in zip(samples, encodings):
        if isinstance(encoding, Exception):
            reason = _row_error("tokenizing", encoding)
            if _SURROGATE.search(chat.text):
                reason = f"text holds a lone UTF-16 surrogate, which is not a character ({reason})"
            _quarantine(
                quarantine,
                Quarantined(record.location, reason, chat.text[:2000], record.file),
                stats,
            )
            continue
        document = isinstance(record, Document)
        if document:
            framing = masking.framing
            n_tokens = len(framing.prefix) + len(encoding) + len(framing.suffix)
            ids.extend(framing.prefix)
            ids.extend(encoding.ids)
            ids.extend(framing.suffix)
            mask = np.ones(n_tokens, dtype=np.uint8)
            mask[:1] = 0  # nothing precedes the first token
            user = (0, 0)  # a document has no user turn for truncate_middle to cut
        else:
            n_tokens = len(encoding)
            ids.extend(encoding.ids)
            failure = None
            try:
                mask, user = masking.mask_and_user_tokens(
                    encoding, np.frombuffer(ids, dtype=np.uint32)[len(ids) - n_tokens :], chat
                )
            except Exception as exc:
                failure = _row_error("loss masking", exc)
            # Past the except block its traceback, which holds the view of the batch array, is
            # gone: only now can the array shrink (or grow for the next sample).
            if failure is not None:
                del ids[len(ids) - n_tokens :]
                _quarantine(
                    quarantine,
                    Quarantined(record.location, failure, chat.text[:2000], record.file),
                    stats,
                )
                continue
        target_tokens = int(mask.sum())
        if target_tokens == 0:
            # A template that drops assistant text, or a one-token document; keep the row visible.
            del ids[len(ids) - n_tokens :]
            stats.no_target_after_tokenize += 1
            reason = (
                "a one-token document has no target token"
                if document
                else "no assistant token left after applying the chat template"
            )
            _quarantine(
                quarantine,
                Quarantined(record.location, reason, chat.text[:2000], record.file),
                stats,
            )
            continue
        lengths.append(n_tokens)
        masks.append(mask)
        targets.append(target_tokens)
        langs.append(
            detect_text_language(record.text) if document else detect_language(record.messages)
        )
        hashes.append(
            int.from_bytes(
                hashlib.blake2b(chat.text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                "little",
            )
        )
        locations.append(record.location)
        positions.append(record.position)
        users.append(user)
        stats.samples += 1
        stats.count_file(record.file, "samples")
        stats.tokens += n_tokens
        stats.target_tokens += target_tokens
    return pa.table(
        {
            "input_ids": _list_array(np.frombuffer(ids, dtype=np.uint32), lengths, pa.uint32()),
            "loss_mask": _list_array(
                np.concatenate(masks) if masks else np.zeros(0, np.uint8), lengths, pa.uint8()
            ),
            "target_tokens": pa.array(targets, pa.int32()),
            "lang": pa.array(langs, pa.string()),
            "text_hash": pa.array(hashes, pa.uint64()),
            "location": pa.array(locations, pa.string()),
            "position": pa.array(positions, pa.int64()),
            "user_start": pa.array([u[0] for u in users], pa.int32()),
            "user_end": pa.array([u[1] for u in users], pa.int32()),
        },
        schema=SCHEMA,
    )


def _list_array(values: np.ndarray, lengths: list[int], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


class TokenCache:
    """Read side of one cache entry: per-sample metadata in memory, tokens memory-mapped."""

    @classmethod
    def open_checked(cls, entry_dir: Path) -> TokenCache:
        """The entry, after checking its files against their checksums (CacheEntryError)."""
        problem = entry_problem(entry_dir)
        if problem:
            raise CacheEntryError(
                f"token cache entry {entry_dir}: {problem}; delete it to rebuild it"
            )
        return cls(entry_dir)

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
        self.lengths = (
            np.concatenate([np.diff(offsets) for offsets, _, _ in self._chunks]).astype(np.int64)
            if self._chunks
            else np.zeros(0, dtype=np.int64)
        )
        self.target_tokens = table.column("target_tokens").to_numpy().astype(np.int64)
        self.lang = np.asarray(table.column("lang").to_pylist(), dtype=object)
        self.text_hash = table.column("text_hash").to_numpy()
        self.position = table.column("position").to_numpy()
        self.user_start = table.column("user_start").to_numpy().astype(np.int64)
        self.user_end = table.column("user_end").to_numpy().astype(np.int64)
        # Through ``total`` so that the files are listed in a fixed (sorted) order.
        self.stats = TokenizeStats.total(
            [TokenizeStats(**json.loads((entry_dir / STATS_FILE).read_text()))]
        )
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
        self._part = np.concatenate(
            [np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)]
        )[order]
        self._local = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])[order]
        for name in (
            "lengths",
            "target_tokens",
            "lang",
            "text_hash",
            "position",
            "user_start",
            "user_end",
        ):
            setattr(self, name, np.concatenate([getattr(p, name) for p in parts])[order])
        self.stats = TokenizeStats.total([p.stats for p in parts])
        self.quarantine_files = [f for p in parts for f in p.quarantine_files]

    def __len__(self) -> int:
        return len(self.lengths)

    def release_pages(self) -> None:
        for part in self._parts:
            part.release_pages()

    def tokens(self, sample: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self._parts[self._part[sample]].tokens(int(self._local[sample]), start, length)
