"""Build the embedded default model: tokenizer trained on the Python standard library's source,
DeepSeek-style chat template, `default`-preset weights with one MTP layer (random until a
training run replaces them).

    .venv/bin/python scripts/build_default_model.py [--weights CHECKPOINT_DIR]

With --weights, the model weights come from that checkpoint (e.g. the output of the example
pre-training job) instead of a random initialisation.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import moeray.model
from moeray.jobs.corpus import stdlib_sources
from moeray.model import ModelArgs, save_checkpoint
from moeray.platform.default_model import DEFAULT_MODEL_DIR

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
PAD = "<｜pad｜>"
# DeepSeek-V3's tool-call and tool-output markup and DeepSeek-R1's reasoning tags, one token each
# (as in DeepSeek's own tokenizers): the model learns each tag as a single step, and a tag is never
# split across BPE merges. Added as ordinary tokens, not special ones, so that decoding keeps them
# and the tool-call and reasoning parsers see them in the text.
MARKUP = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
          "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
          "<｜tool▁output▁end｜>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% else %}{{ raise_exception('unsupported role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The markup's ids come after the merges, inside the model's vocab_size.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(MARKUP),
                                  special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(stdlib_sources(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in MARKUP])
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, the model "
                         f"{vocab_size}: the corpus is too small for the merges")
    # bos through the post-processor as well as add_bos_token, so that Hugging Face's tokenizer
    # (lm-eval's, PEFT users') encodes exactly as moeray's does.
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "add_bos_token": True, "model_max_length": 2048, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="checkpoint folder whose weights to embed")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    opts = parser.parse_args()
    out = opts.out
    tokenizer_source = None
    if opts.weights is not None:
        model = moeray.model.load(opts.weights, mtp_depth=moeray.model.mtp_depth_of(opts.weights))
        args = model.args
        tokenizer_source = opts.weights if (opts.weights / "tokenizer.json").exists() else None
    else:
        args = ModelArgs.preset("default")
        model = moeray.model.build(args, seed=0, mtp_depth=args.num_nextn_predict_layers)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer_ids = {}
    if tokenizer_source is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_source / name, out / name)
    else:
        write_tokenizer(out, args.vocab_size)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    tokenizer_ids = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[PAD]}
    for key, value in tokenizer_ids.items():
        setattr(args, key, value)
    # bfloat16 on disk keeps the package small; the loader converts to the requested dtype.
    save_checkpoint(model, out, args, dtype=torch.bfloat16)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
