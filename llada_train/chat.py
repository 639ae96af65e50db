"""The LLaDA chat template (SPEC §1) as token ids, and the multi-turn split into SFT pairs (SPEC §3).

The one template of the project: SFT records (``data_pipelines.sft_records``) and inference
prompts (``llada_train.eval.text.TextCodec`` with ``chat=true``) are both rendered here.
Text between special tokens is encoded segment by segment, which is what a HF
tokenizer does to the rendered template string (special tokens split the input), so
these ids equal ``apply_chat_template`` on the released tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llada_train.errors import LladaError

ROLES = ("system", "user", "assistant")


@dataclass
class ChatTemplate:
    """Token strings of the template (configuration, never ids); defaults are the released
    LLaDA tokenizer's."""

    bos: str = "<|startoftext|>"
    header_start: str = "<|start_header_id|>"
    header_end: str = "<|end_header_id|>"
    eot: str = "<|eot_id|>"
    header_sep: str = "\n\n"  # text between the header and the content
    assistant_role: str = "assistant"


Segment = int | str  # a special token id, or text to encode


class ChatEncoder:
    """Renders messages to token ids with a ``tokenizers.Tokenizer``."""

    def __init__(self, tok, template: ChatTemplate | None = None) -> None:
        self.tok, self.t = tok, template or ChatTemplate()
        self.ids: dict[str, int] = {}
        for name in ("bos", "header_start", "header_end", "eot"):
            s = getattr(self.t, name)
            i = tok.token_to_id(s)
            if i is None:
                raise LladaError(
                    f"chat template token {name}={s!r} is not in the tokenizer: pass the right token string"
                )
            self.ids[name] = i

    def message_segments(self, role: str, content: str) -> list[Segment]:
        """``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""
        return [
            self.ids["header_start"],
            role,
            self.ids["header_end"],
            self.t.header_sep + content,
            self.ids["eot"],
        ]

    def prompt_segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        """BOS, every message, then the generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``."""
        segs: list[Segment] = [self.ids["bos"]]
        for m in messages:
            segs += self.message_segments(m["role"], m["content"])
        return segs + [
            self.ids["header_start"],
            self.t.assistant_role,
            self.ids["header_end"],
            self.t.header_sep,
        ]

    def response_segments(self, content: str) -> list[Segment]:
        """The answer the model must produce: content then ``<|eot_id|>`` (EOS padding follows later)."""
        return [content, self.ids["eot"]]

    def encode(self, segments: list[list[Segment]]) -> list[list[int]]:
        """Token ids of many segment lists, with all text encoded in one batch call."""
        texts = sorted({s for segs in segments for s in segs if isinstance(s, str) and s})
        enc = dict(
            zip(
                texts,
                (e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)),
                strict=True,
            )
        )
        out = []
        for segs in segments:
            ids: list[int] = []
            for s in segs:
                if isinstance(s, int):
                    ids.append(s)
                elif s:
                    ids += enc[s]
            out.append(ids)
        return out

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a chat prompt ready for generation."""
        return self.encode([self.prompt_segments(messages)])[0]


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Check a ``messages`` list (roles, string contents) and return it; errors name ``where``."""
    if not isinstance(messages, list) or not messages:
        raise LladaError(f"'messages' in {where} must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise LladaError(f"message {i} in {where} needs string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LladaError(
                f"message {i} in {where} has role {m['role']!r}: use one of {', '.join(ROLES)}"
            )
    return messages


def split_turns(messages: list[dict[str, str]]) -> list[tuple[list[dict[str, str]], str]]:
    """An n-turn dialogue -> n (history, answer) pairs; pair k's history holds all earlier turns."""
    return [
        (messages[:i], m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"
    ]
