"""Fine-tune on a longdata build with the stock Hugging Face `transformers.Trainer`.

    python examples/train_with_hf_trainer.py build/quickstart --split ctx16k/train \
        --model meta-llama/Llama-3.2-1B --attn-implementation flash_attention_2 \
        --max-steps 100 --out runs/hf-trainer

`--model tiny-llama` (the default) trains a random 2-layer Llama sized to the build's
vocabulary, on a CPU in seconds. `--trainer trl` runs TRL's `SFTTrainer` instead (`pip install
trl`), on the same rows and batches: the rows are already tokenized, templated and packed, so
its own dataset preparation is skipped. The build's packed rows are fed as they are: `BuildRows`
reads them and `PackedCollator` concatenates a batch into one padding-free sequence whose
`position_ids` restart at every sample and whose `cu_seq_lens_*` mark the samples, so no sample
attends to another (see trainer/hf.py for which attention implementation honours what; use
`flash_attention_2` on a GPU, `sdpa` on a CPU). Labels mask everything but the assistant's
answers and every sample's first token; the model's own loss is the token mean over them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from longdata.format.remote_code import refuse_remote_code  # noqa: E402
from longdata.trainer.hf import BuildRows, PackedCollator, prepare_for_packed_batches  # noqa: E402


def load_causal_lm(name: str, vocab_size: int, attn_implementation: str):
    """A bundled preset (random init) or a pretrained checkpoint / hub id."""
    from transformers import AutoModelForCausalLM

    from longdata.trainer.model import PRESETS, model_config

    if name in PRESETS:
        config = model_config(name, vocab_size)
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, trust_remote_code=False
        )
    refuse_remote_code(name)
    return AutoModelForCausalLM.from_pretrained(
        name, attn_implementation=attn_implementation, trust_remote_code=False
    )


def trl_trainer(model, args, rows: BuildRows, training_args: dict):
    """TRL's SFTTrainer on the build's rows: it takes only `datasets` datasets, and a tokenizer
    (the build's), which with `skip_prepare_dataset` it uses for nothing but special tokens."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from longdata.trainer.tokenizer import load_build_tokenizer

    dataset = datasets.IterableDataset.from_generator(rows.__iter__)
    config = SFTConfig(
        **training_args,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        bf16=False,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=PackedCollator(),
        processing_class=load_build_tokenizer(args.build),
    )


def main(argv: list[str] | None = None) -> object:
    from transformers import Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", help="a longdata build directory")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", default="tiny-llama", help="preset, checkpoint or hub id")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--rows-per-batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default="runs/hf-trainer")
    parser.add_argument("--trainer", choices=("transformers", "trl"), default="transformers")
    args = parser.parse_args(argv)

    rows = BuildRows(args.build, args.split, shuffle=True)
    model = load_causal_lm(args.model, rows.manifest.vocab_size, args.attn_implementation)
    prepare_for_packed_batches(model)  # no KV cache: sdpa/eager then honour the boundaries
    training_args = dict(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.rows_per_batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, args.max_steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the collator's keys are not the model's argument names
        dataloader_num_workers=0,
        dataloader_pin_memory=False,  # rows are small; pinning only matters for a GPU copy
    )
    if args.trainer == "trl":
        trainer = trl_trainer(model, args, rows, training_args)
    else:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**training_args),
            train_dataset=rows,
            data_collator=PackedCollator(),
        )
    result = trainer.train()
    trainer.save_model(args.out)
    print(f"{result.global_step} steps, final training loss {result.training_loss:.4f}")
    return trainer


if __name__ == "__main__":
    main()
