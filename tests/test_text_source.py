"""`kind: text` sources: raw documents read, quarantined, tokenized with every token a target,
and built alone or mixed with chat sources and a real-text anti-haystack."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from transformers import AutoTokenizer

from longdata.build import build
from longdata.recipe import load_recipe, validate_recipe
from longdata.records import Document, Quarantined
from longdata.sources import read_source
from longdata.stages.templates import TemplateError
from longdata.stages.tokenization import TokenCache, tokenize_records
from longdata.tokenizer_assets import ASSET_DIR, BOS, EOT
from longdata.tools.verify import verify_build
from tests.builders import manifest_json

ROOT = Path(__file__).resolve().parent.parent


def text_source(path, **fields):
    return validate_recipe(
        {
            "name": "t",
            "tokenizer": {"name": "builtin:quickstart"},
            "output": {"dir": "out"},
            "packing": {"max_seq_len": 1024},
            "sources": [{"name": "docs", "kind": "text", "path": str(path), **fields}],
        }
    ).sources[0]


def read(source, tmp_path):
    return list(read_source(source, cache_dir=tmp_path / "cache", count_tokens=len))


def test_jsonl_documents_with_a_configured_field_and_bad_rows_quarantined(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"content": "First book.\r\nSecond line."},
        {"text": "wrong field"},
        {"content": 7},
        {"content": "  \n "},
        {"content": "Last book."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read(text_source(path, text_field="content"), tmp_path)
    documents = [r for r in records if isinstance(r, Document)]
    assert [(d.text, d.location, d.position) for d in documents] == [
        ("First book.\nSecond line.", "corpus.jsonl:1", 0),
        ("Last book.", "corpus.jsonl:5", 4),
    ]
    reasons = {r.location: r.reason for r in records if isinstance(r, Quarantined)}
    assert reasons == {
        "corpus.jsonl:2": "no 'content' field (fields: text)",
        "corpus.jsonl:3": "content must be a string, got int",
        "corpus.jsonl:4": "empty document",
    }


def test_parquet_documents(tmp_path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"text": ["alpha doc", "beta doc"], "id": ["a", "b"]}), path)
    records = read(text_source(path), tmp_path)
    assert [(r.text, r.location) for r in records] == [
        ("alpha doc", "part-0.parquet[0]"),
        ("beta doc", "part-0.parquet[1]"),
    ]


def test_directory_of_text_files_sorted_with_bad_bytes_quarantined(tmp_path):
    corpus = tmp_path / "repo"
    (corpus / "src" / "pkg").mkdir(parents=True)
    (corpus / "b.txt").write_text("bee\n")
    (corpus / "a.txt").write_bytes("\ufeffay\r\n".encode())
    (corpus / "src" / "pkg" / "c.txt").write_text("sea")
    (corpus / "src" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus / "notes.md").write_text("not matched")
    records = read(text_source(corpus, glob="**/*.txt"), tmp_path)
    assert [(r.location, getattr(r, "text", None)) for r in records] == [
        ("a.txt", "ay\n"),
        ("b.txt", "bee\n"),
        ("src/latin1.txt", None),
        ("src/pkg/c.txt", "sea"),
    ]
    assert records[2].reason == "not UTF-8: unexpected end of data at byte 3"
    assert [r.position for r in records if isinstance(r, Document)] == [0, 1, 3]
    again = read(text_source(corpus, glob="**/*.txt"), tmp_path)
    assert again == records
    with pytest.raises(FileNotFoundError, match="no files match"):
        read(text_source(corpus, glob="*.rst"), tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no .jsonl"):
        read(text_source(corpus), tmp_path)  # without glob a directory holds data files


def test_glob_cannot_reach_outside_the_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    (corpus / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FileNotFoundError, match="reaches outside"):
        read(text_source(corpus, glob="*.txt"), tmp_path)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSET_DIR))


def test_every_document_token_is_a_target_framed_by_bos_and_eos(tokenizer, tmp_path):
    texts = [
        "The harbour opened at dawn.\n\nBoats left one by one.",
        "研究人员说明漫长的道路。",
        "x",
    ]
    records = [Document(t, f"d:{i}", position=i) for i, t in enumerate(texts)]
    stats = tokenize_records(records, tokenizer, tmp_path / "entry")
    cache = TokenCache(tmp_path / "entry")
    assert stats.samples == 3 and stats.quarantined == 0
    bos, eos = tokenizer.convert_tokens_to_ids([BOS, EOT])
    for i, text in enumerate(texts):
        ids, mask = cache.tokens(i, 0, int(cache.lengths[i]))
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == [bos, *body, eos]
        assert mask.tolist() == [0] + [1] * (len(body) + 1)
        assert tokenizer.decode(ids[mask.astype(bool)]) == text + EOT
    assert cache.lang.tolist() == ["en", "zh", "en"]
    assert stats.target_tokens == stats.tokens - 3


def test_a_document_of_one_token_is_quarantined(tokenizer, tmp_path):
    bare = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    bare.bos_token, bare.eos_token = None, None
    stats = tokenize_records([Document("x", "d:0")], bare, tmp_path / "entry")
    assert (stats.samples, stats.quarantined, stats.no_target_after_tokenize) == (0, 1, 1)
    line = json.loads((tmp_path / "entry" / "quarantine.jsonl").read_text())
    assert line["reason"] == "a one-token document has no target token"


def templateless_tokenizer(tmp_path: Path) -> Path:
    """The quickstart tokenizer as a base model ships it: no chat template."""
    target = tmp_path / "base_tokenizer"
    shutil.copytree(ASSET_DIR, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in target.glob("chat_template.*"):
        extra.unlink()
    return target


def test_a_text_only_recipe_builds_without_a_chat_template(tmp_path):
    tokenizer_dir = templateless_tokenizer(tmp_path)
    data = {
        "name": "pretrain",
        "tokenizer": {"name": str(tokenizer_dir)},
        "sources": [
            {
                "name": "books",
                "kind": "text",
                "path": "builtin:sample/text",
                "sample": {"rows": 12, "min_chars": 1500, "max_chars": 6000},
            }
        ],
        "packing": {"max_seq_len": 2048, "overlength": "split"},
        "validation": {"fraction": 0.0},
        "output": {"dir": str(tmp_path / "out"), "card_dir": str(tmp_path / "cards")},
        "cache_dir": str(tmp_path / "cache"),
    }
    result = build(validate_recipe(data), console=Console(file=io.StringIO()))
    books = manifest_json(result)["sources"][0]
    assert books["kind"] == "text" and books["tokenize"]["samples"] == 12
    assert books["tokenize"]["target_tokens"] == books["tokenize"]["tokens"] - 12
    assert verify_build(result.out_dir).ok
    chat = {
        **data,
        "sources": [{"name": "chat", "kind": "longalign", "path": "builtin:sample/longalign"}],
    }
    with pytest.raises(TemplateError, match="no chat template"):
        build(validate_recipe(chat), console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """recipes/mixed_text.yml, smaller, with a Chinese share that forces heavy trimming."""
    tmp = tmp_path_factory.mktemp("mixed")
    recipe = load_recipe(
        ROOT / "recipes" / "mixed_text.yml",
        [
            f"output.dir={tmp / 'out'}",
            f"output.card_dir={tmp / 'cards'}",
            f"cache_dir={tmp / 'cache'}",
            "sources[0].sample.rows=24",
            "sources[1].sample.rows=8",
            "sources[2].sample.rows=8",
            "sources[3].count=8",
            "language_share={zh: 0.5}",
        ],
    )
    console = Console(file=io.StringIO(), width=200)
    return recipe, build(recipe, console=console), console.file.getvalue()


def test_mixed_recipe_builds_and_its_card_shows_every_source_and_near_duplicates(mixed):
    recipe, result, _ = mixed
    manifest = manifest_json(result)
    kinds = {s["name"]: s["kind"] for s in manifest["sources"]}
    assert kinds == {
        "books": "text",
        "longalign": "longalign",
        "longalpaca": "longalpaca",
        "needles": "antihaystack",
    }
    books = next(s for s in manifest["sources"] if s["name"] == "books")
    mirrors = sum(
        json.loads(line)["meta"]["collection"] == "synthetic-mirror"
        for line in next(Path(recipe.cache_dir, "samples").glob("text-*.jsonl")).open()
    )
    assert mirrors > 0 and books["mix"]["near_duplicates"] == mirrors
    card = (result.out_dir / "README.md").read_text()
    header = (
        "| source | kind | weight | rows read | quarantined | samples | tokens | target tokens "
        "| duplicates | of which near |"
    )
    assert card.count(header) == 1
    row = next(line for line in card.splitlines() if line.startswith("| books | text |"))
    assert row.split(" | ")[8:10] == [str(mirrors), str(mirrors)]
    for name in kinds:
        assert f"| {name} | {kinds[name]} |" in card
    assert verify_build(result.out_dir).ok


def test_mixed_recipe_needles_are_planted_in_the_books_text(mixed):
    recipe, result, _ = mixed
    from longdata.sources import load_haystack

    haystack = load_haystack(("books",), Path(recipe.cache_dir), recipe.text_sources)
    needles = next(s for s in recipe.sources if s.name == "needles")
    records = list(
        read_source(
            needles,
            cache_dir=Path(recipe.cache_dir),
            count_tokens=len,
            text_sources=recipe.text_sources,
        )
    )
    first_sentence = (
        records[0].messages[0].content.split("\n\n")[0].split(". ")[0].removeprefix("Paragraph 1: ")
    )
    known = set(haystack.sentences["en"]) | set(haystack.sentences.get("zh", ()))
    assert any(first_sentence.rstrip(".") in s for s in known)


def test_heavy_language_trimming_warns_on_the_console_and_is_recorded(mixed):
    _, result, output = mixed
    balance = manifest_json(result)["language_balance"]
    assert balance["mode"] == "trim" and balance["discarded"]["en"] > 0.25
    flat = " ".join(output.split())
    assert "warning" in flat and "of the en training tokens" in flat
    assert f"{balance['tokens_before']['en']:,}" in flat
    card = (result.out_dir / "README.md").read_text()
    assert "`language_share` met by `trim`" in card


def test_builtin_text_sample_is_deterministic_and_mirrors_earlier_documents(tmp_path):
    from longdata.sources.samples import write_text

    a = write_text(tmp_path / "a.jsonl", 60, seed=1, min_chars=500, max_chars=2000)
    b = write_text(tmp_path / "b.jsonl", 60, seed=1, min_chars=500, max_chars=2000)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert all(set(r) == {"text", "id", "meta"} for r in rows)
    originals = [r["text"] for r in rows if r["meta"]["collection"] != "synthetic-mirror"]
    mirrors = [r["text"] for r in rows if r["meta"]["collection"] == "synthetic-mirror"]
    assert mirrors and all(any(o in m and o != m for o in originals) for m in mirrors)
    assert len(np.unique([r["text"] for r in rows])) == len(rows)  # near, never exact, copies


def haystack_recipe(tmp_path, haystack):
    return validate_recipe(
        {
            "name": "h",
            "tokenizer": {"name": "builtin:quickstart"},
            "output": {"dir": "out"},
            "packing": {"max_seq_len": 1024},
            "cache_dir": str(tmp_path / "cache"),
            "sources": [
                {"name": "chat", "kind": "longalign", "path": "builtin:sample/longalign"},
                {"name": "books", "kind": "text", "path": "builtin:sample/text"},
                {
                    "name": "needles",
                    "kind": "antihaystack",
                    "count": 2,
                    "length_range": [100, 200],
                    "haystack": haystack,
                },
            ],
        }
    )


def test_haystack_entries_are_paths_or_text_sources(tmp_path):
    from longdata.recipe import RecipeError

    assert haystack_recipe(tmp_path, "books").sources[2].haystack == ("books",)
    assert haystack_recipe(tmp_path, ["books", "essays/"]).sources[2].haystack == (
        "books",
        "essays/",
    )
    with pytest.raises(RecipeError, match="haystack 'chat' names a longalign source"):
        haystack_recipe(tmp_path, "chat")


def test_changing_the_haystack_file_changes_the_cache_key(tmp_path):
    from longdata.pipeline import cache_key
    from longdata.stages.templates import load_tokenizer

    essay = tmp_path / "essay.txt"
    essay.write_text("First version of the essay.")
    recipe = haystack_recipe(tmp_path, str(essay))
    _, info = load_tokenizer(recipe.tokenizer)
    before = cache_key(recipe.sources[2], recipe, info, "template")
    essay.write_text("Second version of the essay.")
    assert cache_key(recipe.sources[2], recipe, info, "template") != before
