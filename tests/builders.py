"""Small synthetic packed rows and builds in the shape `longdata build` writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from longdata.format import COLUMNS, FORMAT, SHARD_HASHES, Manifest


def make_row(
    seq_lens: Sequence[int],
    rng: np.random.Generator,
    vocab_size: int = 512,
    target_fraction: float = 0.7,
    sources: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """One packed row with random tokens; every sample's first token is not a target."""
    total = int(sum(seq_lens))
    loss_mask = (rng.random(total) < target_fraction).astype(np.uint8)
    starts = np.cumsum([0, *seq_lens[:-1]])
    loss_mask[starts] = 0
    return {
        "input_ids": rng.integers(5, vocab_size, total).astype(np.uint32),
        "loss_mask": loss_mask,
        "seq_lens": np.asarray(seq_lens, dtype=np.uint32),
        "source_ids": np.asarray(
            sources if sources is not None else rng.integers(0, 2, len(seq_lens)), dtype=np.uint16
        ),
    }


def _write_split(
    out: Path, split: str, rows_per_stream: dict[str, list[dict[str, np.ndarray]]]
) -> list[dict]:
    """Write one split's MDS streams (one per bucket name); returns their manifest entries."""
    from longdata.format.mds import MDSWriter

    streams = []
    total_tokens = sum(len(r["input_ids"]) for rows in rows_per_stream.values() for r in rows)
    for name, rows in rows_per_stream.items():
        relative = f"{split}/{name}"
        with MDSWriter(
            out=str(out / relative), columns=COLUMNS, compression="zstd", hashes=SHARD_HASHES
        ) as writer:
            for row in rows:
                writer.write(row)
        tokens = sum(len(r["input_ids"]) for r in rows)
        streams.append(
            {
                "name": name,
                "path": relative,
                "rows": len(rows),
                "tokens": tokens,
                "target_tokens": int(sum(r["loss_mask"].sum() for r in rows)),
                "proportion": tokens / total_tokens if total_tokens else 0.0,
            }
        )
    return streams


def _write_manifest(out: Path, vocab_size: int, splits: dict, **extra: object) -> Path:
    manifest = {
        "format": FORMAT,
        "name": "test",
        "tokenizer": {
            "name": "builtin:test",
            "path": "builtin:test",
            "vocab_size": vocab_size,
            "pad_token_id": 3,
            "eos_token_id": 4,
            "sha256": "0" * 64,
        },
        "sources": [{"name": "alpha"}, {"name": "beta"}],
        "splits": splits,
        **extra,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def write_build(
    out: Path,
    rows_per_stream: dict[str, list[dict[str, np.ndarray]]],
    vocab_size: int = 512,
    max_seq_len: int = 256,
    split: str = "train",
) -> Path:
    """Write MDS streams (one per bucket name) and a manifest.json like `longdata build`."""
    streams = _write_split(out, split, rows_per_stream)
    return _write_manifest(
        out, vocab_size, {split: {"max_seq_len": max_seq_len, "streams": streams}}
    )


def staged_build(
    out: Path,
    stages: dict[str, tuple[int, dict[str, list[dict[str, np.ndarray]]]]],
    vocab_size: int = 512,
) -> Path:
    """A curriculum build like `longdata build` with `packing.stages`: per stage (in the given
    order) its max_seq_len and split -> {bucket: rows}, as splits `<stage>/<split>`. Like the
    real manifest, the split keys are stored sorted by name, not in stage order."""
    splits = {}
    for stage, (max_seq_len, split_rows) in stages.items():
        for split, rows_per_stream in split_rows.items():
            name = f"{stage}/{split}"
            streams = _write_split(out, name, rows_per_stream)
            splits[name] = {"max_seq_len": max_seq_len, "stage": stage, "streams": streams}
    recipe = {
        "packing": {
            "stages": [
                {"name": name, "max_seq_len": length} for name, (length, _) in stages.items()
            ]
        }
    }
    return _write_manifest(out, vocab_size, splits, recipe=recipe)


def two_bucket_build(
    out: Path, vocab_size: int, long_lengths: tuple[int, int], max_seq_len: int
) -> Path:
    """16 distinct rows (seeded): 10 of four short samples in bucket le_0048 and 6 of two
    samples with lengths in ``long_lengths`` in the bucket of ``max_seq_len``."""
    rng = np.random.default_rng(0)
    short = [make_row(rng.integers(2, 12, 4).tolist(), rng, vocab_size) for _ in range(10)]
    long = [make_row(rng.integers(*long_lengths, 2).tolist(), rng, vocab_size) for _ in range(6)]
    return write_build(
        out, {"le_0048": short, f"le_{max_seq_len:04d}": long}, vocab_size, max_seq_len
    )


def manifest_json(result) -> dict:
    """The manifest.json a build (a ``BuildResult``) wrote, as JSON."""
    return json.loads((result.out_dir / "manifest.json").read_text())


def assert_rows_accounted(manifest: Manifest) -> None:
    """Every source row of a real build is accounted for (longdata.stages.accounting): the identity
    per source and per file, as ``longdata verify`` checks it."""
    from longdata.stages.accounting import ROW_FATES, accounting_problems

    for source in manifest.sources:
        assert not accounting_problems(source), accounting_problems(source)
        rows = source.rows
        assert rows.rows_read + rows.turn_samples_added == sum(
            getattr(rows, fate) for fate in ROW_FATES
        )


def use_quickstart_tokenizer(
    build: Path, sha256: str | None = None, digest_version: int | None = None
) -> Path:
    """Make the build's manifest name the bundled quickstart tokenizer (its real digest, unless
    ``sha256`` says otherwise), as a build tokenized with it records; ``digest_version=1``
    writes the version 1 digest and no version, as manifests from before version 2 do."""
    from transformers import AutoTokenizer

    from longdata.format import tokenizer_digest
    from longdata.format.tokenizer import DIGEST_VERSION
    from longdata.tokenizer_assets import ASSET_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["tokenizer"].update(
        name="builtin:quickstart",
        path=str(ASSET_DIR),
        sha256=sha256 or tokenizer_digest(tokenizer, digest_version or DIGEST_VERSION),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if digest_version != 1:
        manifest["tokenizer"]["digest_version"] = digest_version or DIGEST_VERSION
    (build / "manifest.json").write_text(json.dumps(manifest))
    return build
