"""The assistant mask covers exactly the assistant text (and its end-of-turn token), for
templates without {% generation %} tags."""

import numpy as np
import pytest

from longdata.recipe import TokenizerConfig
from longdata.records import Message
from longdata.templates import ChatRenderer, TemplateError, assistant_mask, load_tokenizer

CHATML = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}")
CONVERSATION = (
    Message("system", "You answer briefly."),
    Message("user", "Read this long document about rivers and lakes. Where is the needle?"),
    Message("assistant", "The needle is in paragraph 12."),
    Message("user", "和中文呢？"),
    Message("assistant", "第十二段。 Both languages work."),
)


@pytest.fixture(scope="module", params=[None, CHATML], ids=["llama3-style", "inline-chatml"])
def tokenizer(request):
    return load_tokenizer(TokenizerConfig(name="builtin:quickstart", chat_template=request.param))[0]


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
    assert runs == ["The needle is in paragraph 12.<|eot_id|>", "第十二段。 Both languages work.<|eot_id|>"]
    assert mask[0] == 0 and len(mask) == len(ids)


def test_the_tokenizers_own_assistant_mask_would_be_empty(tokenizer):
    """Why the offsets approach exists: without generation tags transformers returns no mask."""
    out = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION],
        return_assistant_tokens_mask=True, return_dict=True, tokenize=True)
    assert sum(out["assistant_masks"]) == 0


def test_assistant_text_equal_to_user_text_is_still_located_by_position(tokenizer):
    messages = (Message("user", "echo"), Message("assistant", "echo"), Message("user", "echo"),
                Message("assistant", "echo"))
    runs, _, _ = masked_text(tokenizer, messages)
    assert runs == ["echo<|eot_id|>", "echo<|eot_id|>"]


def test_template_that_rewrites_history_is_refused():
    rewriting = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: "
                 "{{ m['content'] }}\n{% endfor %}")
    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart", chat_template=rewriting))
    with pytest.raises(TemplateError, match="not a prefix"):
        ChatRenderer(tokenizer).render(CONVERSATION[1:3])


def test_tokenizer_info_is_stable():
    _, first = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    _, second = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    assert first.sha256 == second.sha256 and first.vocab_size == 16384
