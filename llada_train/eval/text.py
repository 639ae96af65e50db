"""Text in and out of token ids for generation and evaluation, via a ``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llada_train.errors import LladaError

# Named chat templates (format strings with {prompt}); SPEC §1 gives LLaDA-Instruct's format.
# Special tokens are written as text: the tokenizer maps them to its own ids.
CHAT_TEMPLATES = {
    "llada": (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
# the end-of-turn token a named template implies, used when eot_token is not set
CHAT_EOT = {"llada": "<|eot_id|>"}


class TextCodec:
    """Encodes prompts (optional chat template and BOS) and decodes completions up to a stop token.

    ``chat_template`` is a format string with ``{prompt}`` or a name in ``CHAT_TEMPLATES``
    (``llada``); special tokens written in it (e.g. ``<|start_header_id|>``) are recognised by
    the tokenizer, so no id is hard-coded.
    """

    def __init__(
        self,
        tokenizer_path: str | Path,
        bos_token_id: int | None = None,
        stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos: bool = True,
    ) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise LladaError(f"tokenizer not found at {path}: pass tokenizer=<path to tokenizer.json>")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.bos_token_id = bos_token_id
        self.stop_ids = set(stop_ids)
        self.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template) if chat_template else None
        self.add_bos = add_bos
        if self.chat_template is not None and "{prompt}" not in self.chat_template:
            raise LladaError(
                f"chat_template must be one of {sorted(CHAT_TEMPLATES)} or contain '{{prompt}}' where the user text goes"
            )

    def token_id(self, token: str) -> int:
        """The id of a (special) token string; a clear error when the tokenizer lacks it."""
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise LladaError(f"token {token!r} is not in the tokenizer's vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        """Plain ids of ``text`` (no template, no BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of a prompt after the chat template, with BOS first when ``add_bos``."""
        text = self.chat_template.format(prompt=prompt) if self.chat_template else prompt
        ids = self.encode(text)
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first stop token (EOS/EoT)."""
        kept: list[int] = []
        for t in ids:
            if t in self.stop_ids:
                break
            kept.append(int(t))
        return self.tokenizer.decode(kept, skip_special_tokens=True)
