"""The assistant mask covers exactly the assistant text (and its end-of-turn token), for
templates without {% generation %} tags."""

from pathlib import Path

import numpy as np
import pytest

from longdata.recipe import TokenizerConfig
from longdata.records import Message
from longdata.stages.templates import (
    ChatRenderer,
    NotPrefixStable,
    TemplateError,
    assistant_mask,
    bind_template_kwargs,
    load_tokenizer,
)

CHATML = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}"
)
CONVERSATION = (
    Message("system", "You answer briefly."),
    Message("user", "Read this long document about rivers and lakes. Where is the needle?"),
    Message("assistant", "The needle is in paragraph 12."),
    Message("user", "和中文呢？"),
    Message("assistant", "第十二段。 Both languages work."),
)


@pytest.fixture(scope="module", params=[None, CHATML], ids=["llama3-style", "inline-chatml"])
def tokenizer(request):
    return load_tokenizer(TokenizerConfig(name="builtin:quickstart", chat_template=request.param))[
        0
    ]


def masked_text(tokenizer, messages) -> tuple[list[str], np.ndarray, list[int]]:
    chat = ChatRenderer(tokenizer).render(messages)
    encoding = tokenizer.backend_tokenizer.encode(chat.text, add_special_tokens=False)
    mask = assistant_mask(encoding, chat.assistant_spans, len(encoding.ids))
    runs, current = [], []
    for token, flag in zip(encoding.ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs, mask, encoding.ids


def test_mask_covers_exactly_each_assistant_turn_and_its_end_token(tokenizer):
    runs, mask, ids = masked_text(tokenizer, CONVERSATION)
    assert runs == [
        "The needle is in paragraph 12.<|eot_id|>",
        "第十二段。 Both languages work.<|eot_id|>",
    ]
    assert mask[0] == 0 and len(mask) == len(ids)


def test_the_tokenizers_own_assistant_mask_would_be_empty(tokenizer):
    """Why the offsets approach exists: without generation tags transformers returns no mask."""
    out = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION],
        return_assistant_tokens_mask=True,
        return_dict=True,
        tokenize=True,
    )
    assert sum(out["assistant_masks"]) == 0


def test_assistant_text_equal_to_user_text_is_still_located_by_position(tokenizer):
    messages = (
        Message("user", "echo"),
        Message("assistant", "echo"),
        Message("user", "echo"),
        Message("assistant", "echo"),
    )
    runs, _, _ = masked_text(tokenizer, messages)
    assert runs == ["echo<|eot_id|>", "echo<|eot_id|>"]


def test_template_that_rewrites_history_becomes_one_sample_per_turn():
    rewriting = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[LAST]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    tokenizer, _ = load_tokenizer(
        TokenizerConfig(name="builtin:quickstart", chat_template=rewriting)
    )
    renderer = ChatRenderer(tokenizer)
    with pytest.raises(NotPrefixStable, match="not a prefix"):
        renderer.render(CONVERSATION)
    samples = renderer.samples(CONVERSATION)
    assert [[chat.text[a:b] for a, b in chat.assistant_spans] for chat in samples] == [
        ["[LAST]assistant: The needle is in paragraph 12."],
        ["[LAST]assistant: 第十二段。 Both languages work."],
    ]
    assert samples[1].text.endswith(
        "user: 和中文呢？\n[LAST]assistant: 第十二段。 Both languages work.\n"
    )


def test_chat_template_kwargs_are_bound_into_the_template():
    qwen3 = str(Path(__file__).parent / "templates" / "qwen3.jinja")
    config = TokenizerConfig(
        name="builtin:quickstart",
        chat_template=qwen3,
        chat_template_kwargs={"enable_thinking": False},
    )
    tokenizer, _ = load_tokenizer(config)
    user = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Bound, not defaulted: a checkpoint's saved template renders as it was trained.
    assert tokenizer.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=True
    ).endswith("</think>\n\n")
    values = {"text": 'say "hi"\n\\ 🙂 é', "count": 3, "ratio": 0.25, "flag": True, "nothing": None}
    probe = bind_template_kwargs(
        "{{ text }}|{{ count + 1 }}|{{ ratio * 2 }}|{{ flag is true }}|{{ nothing is none }}",
        values,
    )
    tokenizer.chat_template = probe
    assert (
        tokenizer.apply_chat_template(user, tokenize=False) == 'say "hi"\n\\ 🙂 é|4|0.5|True|True'
    )


def test_template_variables_longdata_sets_cannot_be_bound():
    from longdata.recipe import RecipeError, validate_recipe

    recipe = {
        "name": "r",
        "tokenizer": {"name": "builtin:quickstart", "chat_template_kwargs": {"messages": []}},
        "sources": [{"name": "a", "kind": "antihaystack", "count": 1, "length_range": [10, 20]}],
        "packing": {"max_seq_len": 64},
        "output": {"dir": "out"},
    }
    with pytest.raises(RecipeError, match="tokenizer.chat_template_kwargs"):
        validate_recipe(recipe)
    recipe["tokenizer"]["chat_template_kwargs"] = {"add_generation_prompt": True}
    with pytest.raises(RecipeError, match="cannot be set"):
        validate_recipe(recipe)


def test_tokenizer_info_is_stable():
    _, first = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    _, second = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    assert first.sha256 == second.sha256 and first.vocab_size == 16384


def test_a_tokenizer_naming_the_generic_fast_class_loads_as_autotokenizer_would_without_torch(
    tmp_path,
):
    """The bundled tokenizer names PreTrainedTokenizerFast: loaded with that class directly it is
    AutoTokenizer's tokenizer, without the torch import AutoTokenizer brings (seconds of every
    build). A directory with a model config.json still goes through AutoTokenizer."""
    import json
    import shutil
    import subprocess
    import sys

    import transformers
    from transformers import AutoTokenizer

    from longdata.format.tokenizer import BUILTIN_TOKENIZERS
    from longdata.stages.templates import _names_generic_fast_class

    bundled = BUILTIN_TOKENIZERS["builtin:quickstart"]
    ours = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))[0]
    auto = AutoTokenizer.from_pretrained(str(bundled), use_fast=True, trust_remote_code=False)
    assert type(ours) is type(auto)
    assert ours.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert ours.init_kwargs == auto.init_kwargs
    assert ours.special_tokens_map == auto.special_tokens_map
    assert ours.chat_template == auto.chat_template

    # transformers 4.x imports torch from its tokenizer module itself (utils.generic), so the
    # saving exists only under 5.x; there the test fails if loading brings torch back.
    if int(transformers.__version__.split(".")[0]) >= 5:
        code = (
            "import sys; from longdata.recipe import TokenizerConfig; "
            "from longdata.stages.templates import load_tokenizer; "
            "load_tokenizer(TokenizerConfig(name='builtin:quickstart')); "
            "assert 'torch' not in sys.modules, 'loading the tokenizer imported torch'"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)

    assert _names_generic_fast_class(bundled)
    model_dir = tmp_path / "model"
    shutil.copytree(bundled, model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not _names_generic_fast_class(model_dir)
    named = tmp_path / "named"
    shutil.copytree(bundled, named)
    config = json.loads((named / "tokenizer_config.json").read_text())
    (named / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"})
    )
    assert not _names_generic_fast_class(named)


# --- masks from ids alone (byte-level BPE) -----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from longdata.stages.templates import ByteLevelMasker  # noqa: E402

# Spaces and newlines at the edges of turns, CJK, accents (precomposed and combining), emoji.
PIECES = [*"ab Z9.,\n\t", "  ", "中文", "段。", "\u00e9", "e\u0301", "\U0001f642", "\u00a0"]
TEXT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=20).map("".join)
TURNS = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3)


def with_backend(tokenizer, edit):
    """A copy of ``tokenizer`` whose tokenizer.json was changed by ``edit(spec)``."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(spec)
    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    copy.chat_template = tokenizer.chat_template
    return copy


def masks_both_ways(tokenizer, turns):
    messages = [
        Message(role, content)
        for user, answer in turns
        for role, content in (("user", user), ("assistant", answer))
    ]
    chat = ChatRenderer(tokenizer).render(messages)
    backend = tokenizer.backend_tokenizer
    with_offsets = backend.encode(chat.text, add_special_tokens=False)
    fast = backend.encode_batch_fast([chat.text], add_special_tokens=False)[0]
    assert fast.ids == with_offsets.ids
    masker = ByteLevelMasker.for_tokenizer(tokenizer)
    from_ids = masker.mask(np.asarray(fast.ids), chat.text, chat.assistant_spans)
    return from_ids, assistant_mask(with_offsets, chat.assistant_spans, len(with_offsets.ids))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=TURNS)
def test_mask_from_ids_equals_mask_from_offsets(tokenizer, turns):
    from_ids, from_offsets = masks_both_ways(tokenizer, turns)
    assert from_ids is not None
    np.testing.assert_array_equal(from_ids, from_offsets)


def test_nfc_normalising_tokenizer_falls_back_to_offsets_only_where_the_text_changes(tokenizer):
    nfc = with_backend(tokenizer, lambda spec: spec.update(normalizer={"type": "NFC"}))
    composed, _ = masks_both_ways(nfc, [("café?", "Oui, café.")])
    assert composed is not None
    decomposed, _ = masks_both_ways(nfc, [("cafe\u0301?", "Oui, cafe\u0301.")])
    assert decomposed is None  # the normaliser rewrote the text: token bytes no longer add up


def test_tokenize_records_masks_and_counts_the_fallbacks(tokenizer, tmp_path):
    from longdata.records import Conversation
    from longdata.stages.tokenization import TokenCache, tokenize_records

    nfc = with_backend(tokenizer, lambda spec: spec.update(normalizer={"type": "NFC"}))
    records = [
        Conversation(
            (Message("user", f"{word} {i}"), Message("assistant", f"{word}!")),
            f"x[{i}]",
            position=i,
        )
        for i, word in enumerate(["café", "cafe\u0301", "plain"])
    ]
    stats = tokenize_records(records, nfc, tmp_path / "cache")
    assert stats.offsets_fallbacks == 1 and stats.samples == 3
    cache = TokenCache(tmp_path / "cache")
    for i, record in enumerate(records):
        chat = ChatRenderer(nfc).render(record.messages)
        encoding = nfc.backend_tokenizer.encode(chat.text, add_special_tokens=False)
        ids, mask = cache.tokens(i, 0, int(cache.lengths[i]))
        assert ids.tolist() == encoding.ids
        np.testing.assert_array_equal(
            mask, assistant_mask(encoding, chat.assistant_spans, len(encoding.ids))
        )


def test_only_byte_level_bpe_gets_masks_from_ids(tokenizer):
    assert ByteLevelMasker.for_tokenizer(tokenizer) is not None
    lowercase = with_backend(tokenizer, lambda spec: spec.update(normalizer={"type": "Lowercase"}))
    assert ByteLevelMasker.for_tokenizer(lowercase) is None
    fallback = with_backend(tokenizer, lambda spec: spec["model"].update(byte_fallback=True))
    assert ByteLevelMasker.for_tokenizer(fallback) is None


def test_a_chat_template_path_that_is_not_a_file_is_refused(tmp_path):
    # Refused by recipe validation already (a pydantic ValueError), and by load_tokenizer too.
    with pytest.raises(ValueError, match="neither a Jinja template nor a file"):
        TokenizerConfig(name="builtin:quickstart", chat_template=str(tmp_path / "chat.jinja"))
    unchecked = TokenizerConfig.model_construct(
        name="builtin:quickstart", revision=None, chat_template=str(tmp_path / "chat.jinja")
    )
    with pytest.raises(TemplateError, match="neither a Jinja template nor a file"):
        load_tokenizer(unchecked)
    (tmp_path / "chat.jinja").write_text(CHATML)
    tokenizer = load_tokenizer(
        TokenizerConfig(name="builtin:quickstart", chat_template=str(tmp_path / "chat.jinja"))
    )[0]
    assert tokenizer.chat_template == CHATML


def test_an_empty_conversation_is_quarantined_before_the_template(tokenizer, tmp_path):
    """transformers 5 refuses to template an empty conversation and 4.x renders it: the row's
    outcome is decided before the template runs, the same on both."""
    import json

    from longdata.records import Conversation
    from longdata.stages.tokenization import QUARANTINE_FILE, tokenize_records

    records = [
        Conversation((), "x[0]", position=0),
        Conversation((Message("user", "Hi"), Message("assistant", "Hello")), "x[1]", position=1),
    ]
    stats = tokenize_records(records, tokenizer, tmp_path / "cache")
    lines = (tmp_path / "cache" / QUARANTINE_FILE).read_text().splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["empty conversation"]
    assert stats.samples == 1 and stats.quarantined == 1


def test_an_assistant_first_history_trains_its_first_turn_after_the_generation_prompt():
    """The first assistant turn's target starts after the template's generation prompt for an
    empty history, which transformers 4.x and 5.x render alike."""
    tokenizer = load_tokenizer(TokenizerConfig(name="builtin:quickstart", chat_template=CHATML))[0]
    renderer = ChatRenderer(tokenizer)
    messages = (
        Message("assistant", "Ask me about rivers."),
        Message("user", "Which is longest?"),
        Message("assistant", "The Nile."),
    )
    prompt = "<|start_header_id|>assistant\n"
    assert renderer.generation_prompt(()) == prompt
    chat = renderer.render(messages)
    assert chat.text.startswith(prompt + "Ask me about rivers.")
    first = chat.assistant_spans[0]
    assert chat.text[first[0] : first[1]] == "Ask me about rivers.<|eot_id|>"
    assert renderer.render_turn(messages, 0).assistant_spans == (first,)


def test_the_tokenizer_digest_is_the_same_on_transformers_4_and_5():
    """Pinned for the bundled tokenizer; `make test` runs it on 5.x and `make test-tf4` on 4.57
    (4.57 lists `additional_special_tokens` in special_tokens_map, 5.x does not)."""
    from longdata.format.tokenizer import tokenizer_digest
    from longdata.recipe import TokenizerConfig
    from longdata.stages.templates import load_tokenizer

    tokenizer = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))[0]
    assert tokenizer_digest(tokenizer) == (
        "049c595e716d93312809d801d1a803eea3f6d7540914bee331ec24919a21ab0c"
    )
