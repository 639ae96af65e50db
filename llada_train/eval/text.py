"""Text in and out of token ids for generation and evaluation, via a ``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llada_train.chat import ChatEncoder, ChatTemplate
from llada_train.errors import LladaError


class TextCodec:
    """Encodes prompts (raw, or as a chat turn) and decodes completions up to a stop token.

    With ``chat`` set, a prompt becomes the user turn of the SPEC §1 template rendered by
    ``ChatEncoder``, the same code that builds SFT records, so inference prompts match
    training prompts token for token; the template's token strings come from ``chat``.
    """

    def __init__(
        self,
        tokenizer_path: str | Path,
        bos_token_id: int | None = None,
        stop_ids: Sequence[int] = (),
        chat: ChatTemplate | None = None,
        add_bos: bool = True,
        system: str | None = None,
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
        self.chat = ChatEncoder(self.tokenizer, chat) if chat is not None else None
        self.add_bos = add_bos
        self.system = system
        if system is not None and self.chat is None:
            raise LladaError("a system message needs the chat template: set chat=true")

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
        """Ids of a prompt: the chat template's when set (BOS included), else raw with BOS first
        when ``add_bos``."""
        if self.chat is not None:
            system = [{"role": "system", "content": self.system}] if self.system is not None else []
            return self.chat.encode_prompt([*system, {"role": "user", "content": prompt}])
        ids = self.encode(prompt)
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
