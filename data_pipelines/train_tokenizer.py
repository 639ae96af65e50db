"""Train a small byte-level BPE tokenizer whose special tokens have fixed ids 0..5."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from llada_train.errors import LladaError, exit_on_error

# Order matters: ids are the positions (the ``tiny`` model preset relies on bos 0, eos 1, mask 2).
SPECIAL_TOKENS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# Jinja chat template of SPEC §1, stored for HF ``apply_chat_template`` users.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def train_bpe(
    files: list[str | Path],
    vocab_size: int = 512,
    min_frequency: int = 2,
    texts: Iterable[str] | None = None,
):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``files`` (or ``texts``); specials get ids 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise LladaError(
            f"tokenizer vocab_size={vocab_size} is too small: use at least {len(SPECIAL_TOKENS) + 256}"
        )
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise LladaError(
            f"tokenizer training files not found: {', '.join(missing)}: pass existing text files"
        )
    if texts is None and files and all(Path(f).stat().st_size == 0 for f in files):
        raise LladaError(
            f"tokenizer training files are empty: {', '.join(map(str, files))}: pass files with text"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    if texts is not None:
        tok.train_from_iterator(texts, trainer)
    else:
        tok.train([str(f) for f in files], trainer)
    for i, s in enumerate(SPECIAL_TOKENS):  # the contract the model presets rely on
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """Write tokenizer.json plus HF tokenizer_config.json / special_tokens_map.json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "mask_token": SPECIAL_TOKENS[2],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        **specials,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "tokenizer.json"


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """CLI: ``llada-train-tokenizer --out DIR FILE...``."""
    ap = argparse.ArgumentParser(prog="llada-train-tokenizer", description=__doc__)
    ap.add_argument("files", nargs="+", help="text files to train on")
    ap.add_argument("--out", required=True, help="folder for tokenizer.json and HF config files")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)
    tok = train_bpe(args.files, args.vocab_size, args.min_frequency)
    path = save_tokenizer(tok, args.out)
    print(f"wrote {path} (vocab {tok.get_vocab_size()})")
    print(f"next: llada-tokenize --input {' '.join(args.files)} --tokenizer {args.out} --out SHARDS_DIR")


if __name__ == "__main__":
    main()
