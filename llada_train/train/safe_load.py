"""Unpickle checkpoint files without running code: ``weights_only`` and a three-class allowlist.

A sha256 manifest (``manifest.py``) catches a damaged file, not a folder forged whole: anyone
can recompute a manifest. So every checkpoint file this project reads (our rank state,
DeepSpeed's ``engine.load_checkpoint`` at every ZeRO stage, ``zero_to_fp32`` in export) is
unpickled with ``weights_only=True``: tensors, plain containers and numbers, and the classes of
:func:`allowlist` only. No setting turns full unpickling back on.

DeepSpeed passes ``weights_only=False`` to ``torch.load`` itself, in several modules, so
:func:`weights_only_loads` overrides that for the duration of one load. Before a multi-rank
resume, :func:`check_pickles` scans every file's pickle (no tensor data, nothing run) so all
ranks refuse a forged shard together, even one only its own rank reads.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.train.manifest import _first_bad_index, _share, list_files

_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's own override of an explicit weights_only=False
_NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # set together with the above, torch raises
_torch_load: Callable[..., Any] = torch.load  # the real loader, captured before any scope wraps it
_FIX = "restore the original checkpoint, or resume from an older one (point latest at it)"


def allowlist() -> list[type]:
    """The classes DeepSpeed checkpoints hold beyond what ``weights_only`` allows by default.

    Found by saving real checkpoints (ZeRO 0-3; fp32, bf16 and bf16 with fp32 gradient
    accumulation; LoRA at ZeRO 0/2/3) and loading every file with ``weights_only=True``.
    Each is plain data: building one runs no code beyond setting its fields.
    """
    # the ZeRO 1-3 optimizer state's "loss_scaler" (a static scale: cur_scale, dynamic)
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    # the ZeRO 1-3 optimizer state's "zero_stage" (an int enum)
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # ZeRO 1-2 and the bf16 optimizer's "param_slice_mappings" (a dataclass: numel, start)
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _allowed() -> Any:
    """``safe_globals`` for the allowlist classes not already allowed (its exit removes what it
    added, so a nested scope must not add, and then remove, an outer scope's classes)."""
    present = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals([c for c in allowlist() if c not in present])


def _name(f: Any) -> str:
    return str(f) if isinstance(f, (str, os.PathLike)) else str(getattr(f, "name", f))


def _reason(exc: BaseException) -> str:
    """The one informative line of torch's long weights_only message."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error: (.+?)(?: Please use| Check the|\n|$)", text)
    line = found.group(1) if found else (text.strip().splitlines() or [type(exc).__name__])[0]
    return line.strip().rstrip(".")


def refused(what: str, exc: BaseException) -> LladaError:
    """The one-line refusal of a checkpoint file that weights_only will not unpickle."""
    if isinstance(exc, pickle.UnpicklingError):
        return LladaError(
            f"{what} holds objects outside the checkpoint allowlist ({_reason(exc)}): the "
            f"checkpoint is refused and nothing in it was run; {_FIX}"
        )
    return LladaError(f"{what} cannot be read as a checkpoint file ({_reason(exc)}): it is "
                      f"truncated or corrupt; {_FIX}")


def torch_load(f: Any, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load`` of one checkpoint file, weights-only with :func:`allowlist`.

    Whatever ``weights_only`` or ``pickle_module`` a caller (DeepSpeed) passes is ignored.
    A file it refuses, or cannot read, is a ``LladaError`` naming it.
    """
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)  # torch refuses a pickle_module together with weights_only
    try:
        with _allowed():
            return _torch_load(f, map_location=map_location, weights_only=True, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise refused(_name(f), exc) from None


def _guarded_load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
    """``torch.load``'s signature; ``pickle_module`` is dropped (weights_only has its own)."""
    return torch_load(f, map_location, **kwargs)


@contextlib.contextmanager
def weights_only_loads(where: Path) -> Iterator[None]:
    """Within: every ``torch.load`` in this process is :func:`torch_load`.

    ``torch.load`` (and ``torch.serialization.load``) are replaced for DeepSpeed's calls;
    torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` and the allowlist also cover a loader bound
    before the scope began. A refusal that escapes unnamed is reported against ``where``.
    """
    saved_env = {k: os.environ.get(k) for k in (_FORCE_ENV, _NO_FORCE_ENV)}
    os.environ[_FORCE_ENV] = "1"
    os.environ.pop(_NO_FORCE_ENV, None)
    saved_load = torch.load, torch.serialization.load
    torch.load = torch.serialization.load = _guarded_load
    try:
        with _allowed():
            yield
    except pickle.UnpicklingError as exc:
        raise refused(f"a file of {where}", exc) from None
    finally:
        torch.load, torch.serialization.load = saved_load
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _outside(path: Path) -> str | None:
    """Why ``path`` is refused (a static read of its pickle: nothing runs), or None. Every
    ``.pt`` DeepSpeed and we write is a torch.save zip archive of allowlisted objects."""
    try:
        with _allowed():
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except pickle.UnpicklingError as exc:  # an opcode weights_only would not run either
        return f"holds objects outside the checkpoint allowlist ({_reason(exc)})"
    except (ValueError, RuntimeError, OSError, EOFError) as exc:
        return f"is not a readable torch.save archive ({_reason(exc)})"
    if found:
        return f"holds objects outside the checkpoint allowlist (GLOBAL {', '.join(sorted(found))})"
    return None


def check_pickles(
    folder: Path, rank: int = 0, world: int = 1, device: torch.device | None = None
) -> None:
    """Collective: refuse ``folder`` on every rank when any ``.pt`` in it holds globals outside
    the allowlist. Ranks scan disjoint shares, then agree (as ``verify_manifest`` does) so
    the refusal is one line, not one rank's error and the others' lost-peer tracebacks."""
    names = [n for n in list_files(folder) if n.endswith(".pt")]
    mine = set(_share(names, rank, world))
    bad = next((i for i, n in enumerate(names) if n in mine and _outside(folder / n)), None)
    bad = _first_bad_index(bad, device)
    if bad is not None:  # every rank re-reads that one pickle: the same line on all of them
        path = folder / names[bad]
        raise LladaError(f"{path} {_outside(path)}: the checkpoint is refused and nothing in it "
                         f"was run; {_FIX}")
