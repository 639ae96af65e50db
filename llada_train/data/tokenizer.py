"""Load a ``tokenizers`` tokenizer from a tokenizer.json file or a HF tokenizer folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llada_train.errors import LladaError

DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"


def tokenizer_json_path(path: str | Path) -> Path:
    """The tokenizer.json file for ``path`` (the file itself, or ``path/tokenizer.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise LladaError(
            f"tokenizer not found at {path}: pass a tokenizer.json file or a folder containing one"
        )
    return p


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large shards need no extra memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 of the tokenizer.json bytes: identifies the tokenizer a shard set was made with."""
    return file_sha256(tokenizer_json_path(path))


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file or a folder holding one."""
    from tokenizers import Tokenizer

    p = tokenizer_json_path(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust error text is the useful part
        raise LladaError(f"cannot read tokenizer {p}: {exc}") from exc


def vocab_size_of(tok) -> int:
    """Number of ids the tokenizer can emit (max id + 1, added tokens included)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def _config_token(folder: Path, key: str) -> str | None:
    """A special token string from tokenizer_config.json / special_tokens_map.json, if present."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            value = json.loads(f.read_text()).get(key)
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, dict):  # HF AddedToken serialisation
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


@dataclass
class SpecialIds:
    """Ids of the tokens the pipelines insert; ``bos`` may be None when the tokenizer has none."""

    eos: int
    bos: int | None
    eos_token: str
    bos_token: str | None


def resolve_special_ids(
    tok, path: str | Path, eos_token: str | None = None, bos_token: str | None = None
) -> SpecialIds:
    """Find EOS/BOS ids: explicit strings, else LLaDA's names, else the folder's config files."""
    folder = tokenizer_json_path(path).parent

    def find(explicit: str | None, default: str, key: str) -> tuple[int | None, str | None]:
        candidates = [explicit] if explicit else [default, _config_token(folder, key)]
        for c in candidates:
            if c is not None and tok.token_to_id(c) is not None:
                return tok.token_to_id(c), c
        return None, explicit

    eos, eos_s = find(eos_token, DEFAULT_EOS, "eos_token")
    if eos is None:
        raise LladaError(
            f"EOS token {eos_token or DEFAULT_EOS!r} not in tokenizer {path}: "
            "pass --eos-token with a token the tokenizer has"
        )
    bos, bos_s = find(bos_token, DEFAULT_BOS, "bos_token")
    if bos_token and bos is None:
        raise LladaError(f"BOS token {bos_token!r} not in tokenizer {path}: pass an existing token")
    return SpecialIds(eos=eos, bos=bos, eos_token=eos_s, bos_token=bos_s)
