"""Regenerate the quickstart tokenizer shipped in ``longdata/assets/quickstart_tokenizer/``.

    python -m longdata.tokenizer_assets [--out DIR]

The build machines cannot reach a model hub, so the quickstart recipe and the tests need a
tokenizer that lives in the repository. It is a byte-level BPE (any Unicode round-trips) trained
on seeded synthetic English and Chinese text, with Llama-3.1-style special tokens and chat
template, so code paths written for Llama 3 run unchanged on it.

The chat template deliberately has no ``{% generation %}`` markers: the pipeline derives
assistant masks from character offsets and must be tested on a template without them. Encoding
never adds a BOS on its own (no post-processor) because the template already starts with one.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longdata.sources import synthetic

ASSET_DIR = Path(__file__).parent / "assets" / "quickstart_tokenizer"
VOCAB_SIZE = 16_384
SEED = 20240917

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD)

# Message content is inserted verbatim (no trim) so that its characters appear unchanged in the
# rendered string, which is what offset-based assistant masking relies on.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Corpus mix in characters. The filler vocabulary is only a few hundred words, so made-up words
# are added to give BPE enough distinct material to fill the vocabulary with reusable subwords
# instead of stopping early; they also keep unseen real words from falling apart into bytes.
EN_CHARS = 3_000_000
ZH_CHARS = 1_000_000
MADE_UP_CHARS = 1_500_000

_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "y",
    "z",
    "br",
    "cr",
    "dr",
    "fr",
    "gr",
    "pr",
    "tr",
    "bl",
    "cl",
    "fl",
    "gl",
    "pl",
    "sl",
    "st",
    "sp",
    "sk",
    "sh",
    "ch",
    "th",
    "wh",
    "qu",
    "str",
)
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oa", "ou", "oo", "au")
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "ll", "nt", "ss"]
_PUNCTUATION = (". ", ", ", "; ", ": ", "! ", "? ", " - ", " (", ") ", ' "', '" ', "\n")


def _made_up_word(rng: random.Random) -> str:
    syllables = rng.randint(1, 4)
    word = "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    )
    roll = rng.random()
    if roll < 0.1:
        return word.capitalize()
    if roll < 0.12:
        return word.upper()
    if roll < 0.2:
        return str(rng.randint(0, 10 ** rng.randint(1, 6)))
    return word


def _made_up_lines(rng: random.Random, n_chars: int) -> Iterator[str]:
    produced = 0
    while produced < n_chars:
        pieces = []
        for _ in range(rng.randint(5, 40)):
            pieces.append(_made_up_word(rng))
            pieces.append(rng.choice(_PUNCTUATION) if rng.random() < 0.15 else " ")
        line = "".join(pieces)
        produced += len(line)
        yield line


def _chinese_words(rng: random.Random, n_chars: int) -> Iterator[str]:
    """Chinese filler one word per item, with the punctuation as items of its own.

    Chinese has no spaces, so trained on whole sentences BPE would spend the vocabulary on
    multi-word phrases of the tiny synthetic vocabulary. Separate items cap a token at one word,
    giving a chars/token closer to real Chinese tokenizers.
    """
    vocabulary = (
        synthetic.ZH_SUBJECTS
        + synthetic.ZH_ADVERBS
        + synthetic.ZH_VERBS
        + synthetic.ZH_ADJECTIVES
        + synthetic.ZH_NOUNS
        + synthetic.ZH_CONNECTIVES
        + synthetic.ZH_OPENERS
        + ("，", "。", "？")
    )
    produced = 0
    while produced < n_chars:
        word = rng.choice(vocabulary)
        produced += len(word)
        yield word


def training_corpus(seed: int = SEED) -> Iterator[str]:
    rng = random.Random(seed)
    yield from synthetic.document(rng, "en", EN_CHARS)
    yield from _chinese_words(rng, ZH_CHARS)
    yield from _made_up_lines(rng, MADE_UP_CHARS)


def train_tokenizer(seed: int = SEED) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Specials are appended after training, as in Llama 3, so the total is exactly VOCAB_SIZE.
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(seed), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TEXT, START_HEADER, END_HEADER],
        chat_template=CHAT_TEMPLATE,
        # Decoding must give back the exact text; the default clean-up rewrites " ." and friends.
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # Template inside tokenizer_config.json (not chat_template.jinja): older transformers read it.
    hf.save_pretrained(str(out_dir), save_jinja_files=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    started = time.perf_counter()
    tokenizer = train_tokenizer(args.seed)
    save_hf_tokenizer(tokenizer, args.out)
    elapsed = time.perf_counter() - started
    print(f"trained vocab {tokenizer.get_vocab_size()} in {elapsed:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
