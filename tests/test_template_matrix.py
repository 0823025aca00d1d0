"""Every template shape people fine-tune with today, built through the real tokenize stage: the
targets decode to exactly the assistant text plus the end-of-turn token, each turn as the
template renders it when the conversation ends there, on both masking paths (token ids alone,
and real offsets).

The templates under tests/templates/ are written for this suite in the shapes of Llama 3.1,
Qwen3 (which drops earlier turns' reasoning, and pre-fills an empty think block under
enable_thinking=false), Mistral ([INST], no generation prompt), ChatML and Gemma (no system
role). The tokenizer is the bundled byte-level BPE one with each template's special tokens added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from longdata.recipe import TokenizerConfig
from longdata.records import Conversation, Message
from longdata.stages.templates import ByteLevelMasker, bind_template_kwargs, load_tokenizer
from longdata.stages.tokenization import TokenCache, tokenize_records
from tests.builders import manifest_json

TEMPLATES = Path(__file__).parent / "templates"
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_TAGS = ("<think>", "</think>")


@dataclass(frozen=True)
class Shape:
    name: str
    template: str  # file under tests/templates/
    special_tokens: tuple[str, ...]
    end_of_turn: str
    reply_prefix: str = ""  # what the template writes before the content inside the target
    kwargs: tuple[tuple[str, object], ...] = ()
    rewrites_history: bool = False  # multi-turn conversations become one sample per turn

    def target(self, content: str) -> str:
        if self.reply_prefix == EMPTY_THINK and content.startswith("<think>"):
            return content + self.end_of_turn  # its own reasoning replaces the empty block
        return self.reply_prefix + content + self.end_of_turn


SHAPES = [
    Shape("llama3.1", "llama3.jinja", (), "<|eot_id|>"),
    Shape(
        "qwen3",
        "qwen3.jinja",
        ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        "<|im_end|>",
        reply_prefix=EMPTY_THINK,
        rewrites_history=True,
    ),
    Shape(
        "qwen3-no-thinking",
        "qwen3.jinja",
        ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        "<|im_end|>",
        kwargs=(("enable_thinking", False),),
        rewrites_history=True,
    ),
    Shape(
        "mistral", "mistral.jinja", ("<s>", "</s>", "[INST]", "[/INST]"), "</s>", reply_prefix=" "
    ),
    Shape("chatml", "chatml.jinja", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    Shape("gemma", "gemma.jinja", ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
]

REASONING = "<think>\nThe question asks for a paragraph.\n</think>\n\n"
CONVERSATIONS = {
    "single": (
        Message("user", "Where is the needle? Read the document first."),
        Message("assistant", "The needle is in paragraph 12."),
    ),
    "system": (
        Message("system", "You answer briefly."),
        Message("user", "长文档里针在哪里？"),
        Message("assistant", "第十二段。 Both languages work."),
    ),
    "multi": (
        Message("system", "You answer briefly."),
        Message("user", "Read this long document about rivers. Where is the needle?"),
        Message("assistant", "The needle is in paragraph 12."),
        Message("user", "And the second one?"),
        Message("assistant", "Paragraph 40, after the lake."),
    ),
}


def shaped_tokenizer(shape: Shape, path: str):
    """The bundled tokenizer with ``shape``'s template and tokens; ``path="offsets"`` turns off
    masking from ids (byte_fallback set: same tokens, but no longer provably byte-level)."""
    base, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    spec = json.loads(base.backend_tokenizer.to_str())
    if path == "offsets":
        spec["model"]["byte_fallback"] = True
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=base.bos_token,
        eos_token=base.eos_token,
    )
    # Qwen3's own tokenizer adds <think> and </think> as plain (special: false) tokens: assistant
    # text holds them, and the template reads them there.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in shape.special_tokens if t not in THINK_TAGS]}
    )
    tokenizer.add_tokens([t for t in shape.special_tokens if t in THINK_TAGS])
    template = (TEMPLATES / shape.template).read_text(encoding="utf-8")
    tokenizer.chat_template = bind_template_kwargs(template, dict(shape.kwargs))
    assert (ByteLevelMasker.for_tokenizer(tokenizer) is None) == (path == "offsets")
    return tokenizer


def target_runs(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each maximal run of target tokens, decoded."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def build(tokenizer, conversations, tmp_path, multi_turn: str = "auto"):
    records = [
        Conversation(messages, f"row[{i}]", position=i) for i, messages in enumerate(conversations)
    ]
    stats = tokenize_records(records, tokenizer, tmp_path / "cache", multi_turn=multi_turn)
    cache = TokenCache(tmp_path / "cache")
    samples = [cache.tokens(i, 0, int(cache.lengths[i])) for i in range(len(cache))]
    return stats, cache, samples


@pytest.mark.parametrize("path", ["ids", "offsets"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_targets_are_each_turn_as_rendered_at_inference(shape, path, tmp_path):
    tokenizer = shaped_tokenizer(shape, path)
    stats, cache, samples = build(tokenizer, CONVERSATIONS.values(), tmp_path)
    assert stats.quarantined == 0 and stats.offsets_fallbacks == 0

    expected = [
        [shape.target(m.content) for m in messages if m.role == "assistant"]
        for messages in CONVERSATIONS.values()
    ]
    if shape.rewrites_history:  # the two-turn conversation: one sample per assistant turn
        expected = expected[:2] + [[turn] for turn in expected[2]]
    assert [target_runs(tokenizer, ids, mask) for ids, mask in samples] == expected
    assert stats.split_conversations == shape.rewrites_history
    assert stats.turn_samples == 2 * shape.rewrites_history
    assert cache.position.tolist() == ([0, 1, 2, 2] if shape.rewrites_history else [0, 1, 2])

    # Each sample is the whole conversation rendered up to its last target, as the template
    # renders it when the conversation ends there.
    turns = [
        [{"role": m.role, "content": m.content} for m in messages]
        for messages in CONVERSATIONS.values()
    ]
    ends_there = [turns[0], turns[1], turns[2][:3], turns[2]] if shape.rewrites_history else turns
    for (ids, _), conversation in zip(samples, ends_there):
        assert tokenizer.decode(ids.tolist()) == tokenizer.apply_chat_template(
            conversation, tokenize=False
        )


@pytest.mark.parametrize("path", ["ids", "offsets"])
def test_qwen3_reasoning_is_trained_where_the_turn_ends_the_conversation(path, tmp_path):
    """An earlier turn's reasoning is dropped once a user turn follows it, so it is trained only
    in that turn's own sample, as the model wrote it."""
    shape = SHAPES[1]
    tokenizer = shaped_tokenizer(shape, path)
    messages = list(CONVERSATIONS["multi"])
    messages[2] = Message("assistant", REASONING + "The needle is in paragraph 12.")
    _, _, samples = build(tokenizer, [messages], tmp_path)
    runs = [target_runs(tokenizer, ids, mask) for ids, mask in samples]
    assert runs == [
        [REASONING + "The needle is in paragraph 12.<|im_end|>"],
        [EMPTY_THINK + "Paragraph 40, after the lake.<|im_end|>"],
    ]
    second = tokenizer.decode(samples[1][0].tolist())
    assert "The question asks" not in second  # the template dropped it from the later prompt
    assert "<|im_start|>assistant\nThe needle is in paragraph 12.<|im_end|>" in second


@pytest.mark.parametrize(
    "policy, expected",
    [
        (
            "per_turn",
            [
                ["The needle is in paragraph 12.<|eot_id|>"],
                ["Paragraph 40, after the lake.<|eot_id|>"],
            ],
        ),
        ("last_turn", [["Paragraph 40, after the lake.<|eot_id|>"]]),
    ],
)
def test_multi_turn_policies_on_a_prefix_stable_template(policy, expected, tmp_path):
    tokenizer = shaped_tokenizer(SHAPES[0], "ids")
    stats, _, samples = build(tokenizer, [CONVERSATIONS["multi"]], tmp_path, multi_turn=policy)
    assert [target_runs(tokenizer, ids, mask) for ids, mask in samples] == expected
    assert (stats.split_conversations, stats.turn_samples) == (
        (1, 2) if policy == "per_turn" else (0, 0)
    )


def test_last_turn_keeps_a_rewriting_template_to_one_sample(tmp_path):
    tokenizer = shaped_tokenizer(SHAPES[1], "ids")
    stats, _, samples = build(tokenizer, [CONVERSATIONS["multi"]], tmp_path, multi_turn="last_turn")
    assert [target_runs(tokenizer, ids, mask) for ids, mask in samples] == [
        [EMPTY_THINK + "Paragraph 40, after the lake.<|im_end|>"]
    ]
    assert stats.samples == 1 and stats.split_conversations == 0


def test_reasoning_under_enable_thinking_false_is_a_row_error_with_its_reason(tmp_path):
    """The pre-filled empty think block contradicts a turn that carries reasoning: the turn's
    start cannot be found, and the row (not the build) is quarantined with the reason."""
    from longdata.records import RowError
    from longdata.stages.templates import ChatRenderer

    tokenizer = shaped_tokenizer(SHAPES[2], "ids")
    messages = (Message("user", "Where?"), Message("assistant", REASONING + "Here."))
    with pytest.raises(RowError, match="generation prompt is not a prefix"):
        ChatRenderer(tokenizer).samples(messages)
    stats, cache, _ = build(tokenizer, [messages, CONVERSATIONS["single"]], tmp_path)
    assert (stats.rows_read, stats.quarantined, stats.samples) == (2, 1, 1)
    [line] = (tmp_path / "cache" / "quarantine.jsonl").read_text().splitlines()
    assert json.loads(line)["location"] == "row[0]" and "not a prefix" in json.loads(line)["reason"]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_niah_prompt_and_answer_are_the_training_sample(shape, tmp_path, monkeypatch):
    """An eval prompt followed by its scored answer is, token for token, what training builds
    from [user: the prompt's text, assistant: the needle sentence], and the answer is exactly
    its target: the model is scored on the format it was trained to write."""
    from longdata.evals.niah import prompts as niah

    tokenizer = shaped_tokenizer(shape, "ids")
    user_of = {}
    render = niah.generation_prompt

    def recording(tokenizer, user_text):
        prompt = render(tokenizer, user_text)
        user_of[prompt] = user_text
        return prompt

    monkeypatch.setattr(niah, "generation_prompt", recording)
    item = niah.build_prompt(tokenizer, length=320, depth=0.5, sample=0, distractors=2)
    user = user_of[tokenizer.decode(list(item.prompt_ids))]
    _, _, [(ids, mask)] = build(
        tokenizer, [(Message("user", user), Message("assistant", item.answer))], tmp_path
    )

    prompt, answer = list(item.prompt_ids), list(item.answer_ids)
    assert ids[: len(prompt) + len(answer)].tolist() == prompt + answer
    assert mask.tolist() == [0] * len(prompt) + [1] * len(answer) + [0] * (
        len(ids) - len(prompt) - len(answer)
    )
    assert tokenizer.decode(answer) == shape.target(item.answer)
    for sentence, distractor in zip(item.distractors, item.distractor_ids):
        assert tokenizer.decode(list(distractor)) == shape.target(sentence)
        assert len(distractor) == len(answer)


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "enable_thinking-false"])
def test_a_two_turn_qwen3_conversation_builds(thinking, tmp_path):
    """Through the recipe and the whole build: no row lost, the expansion counted, each turn's
    target as the template renders it when the conversation ends there."""
    from longdata.build import build
    from longdata.recipe import validate_recipe
    from longdata.tools.verify import iter_stream_rows

    data = tmp_path / "chats.jsonl"
    turns = CONVERSATIONS["multi"]
    data.write_text(
        json.dumps({"messages": [{"role": m.role, "content": m.content} for m in turns]}) + "\n"
    )
    kwargs = {} if thinking else {"enable_thinking": False}
    result = build(
        validate_recipe(
            {
                "name": "qwen3",
                "tokenizer": {
                    "name": "builtin:quickstart",
                    "chat_template": str(TEMPLATES / "qwen3.jinja"),
                    "chat_template_kwargs": kwargs,
                },
                "sources": [
                    {"name": "chats", "kind": "generic", "format": "messages", "path": str(data)}
                ],
                "packing": {"max_seq_len": 512, "algorithm": "next_fit"},
                "validation": {"fraction": 0.0},
                "output": {"dir": str(tmp_path / "out"), "card_dir": str(tmp_path / "cards")},
                "cache_dir": str(tmp_path / "cache"),
            }
        )
    )
    stats = manifest_json(result)["sources"][0]["tokenize"]
    assert (stats["rows_read"], stats["quarantined"], stats["samples"]) == (1, 0, 2)
    assert (stats["split_conversations"], stats["turn_samples"]) == (1, 2)

    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    [(_, _, row)] = list(iter_stream_rows(next((result.out_dir / "train").glob("le_*")), []))
    prefix = EMPTY_THINK if thinking else ""
    assert target_runs(tokenizer, row["input_ids"], row["loss_mask"]) == [
        prefix + "The needle is in paragraph 12.<|im_end|>",
        prefix + "Paragraph 40, after the lake.<|im_end|>",
    ]
