"""Strict schemas: keys a typed config node's dataclass does not know are refused.

Hydra's ``+key=value`` appends a key past the structured-config schema, and OmegaConf then
keeps it as an attribute nothing reads: ``+trainer.max_stepz=3`` would be silently ignored
and ``+logging.api_key=...`` would be written into ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, OmegaConf


def not_a_setting(path: str, typ: type) -> str:
    """``"<path> is not a setting of <Dataclass>"``, with the closest setting when one is near."""
    names = [f.name for f in dataclasses.fields(typ)] if dataclasses.is_dataclass(typ) else []
    near = difflib.get_close_matches(path.rsplit(".", 1)[-1], names, n=1)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = f" (did you mean {parent}{near[0]}?)" if near else ""
    return f"{path} is not a setting of {typ.__name__}{hint}"


def stray_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """``not_a_setting`` for every key outside its node's schema."""
    typ = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    out: list[str] = []
    for key, value in node.items_ex(resolve=False):
        path = f"{prefix}{key}"
        if names is not None and key not in names:
            out.append(not_a_setting(path, typ))
        elif isinstance(value, DictConfig):
            out += stray_keys(value, path + ".")
    return out
