"""sha256 manifests of checkpoint folders: a damaged, replaced, added or missing file is refused.

The writer records the size and sha256 of every file of a step folder in ``manifest.json``
before ``latest`` names it; the reader refuses any folder that does not match it, before
DeepSpeed opens a file. This is the corruption check only: anyone can recompute a manifest,
so it is no defence against a forged folder. That is ``safe_load``'s job (every file unpickles
weights-only), which no setting here turns off.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llada_train.atomic import write_json_atomic
from llada_train.errors import LladaError

MANIFEST = "manifest.json"
TRUST_ENV = "LLADA_TRUST_UNVERIFIED_CHECKPOINTS"
_DIGESTS = ".digests_rank_"  # per-rank partial results, merged into the manifest by rank 0
_CHUNK = 16 << 20  # hash in 16 MiB pieces: multi-GB optimizer shards never sit in memory


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (relative, sorted), except the manifest and partials."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(_DIGESTS):
            out.append(rel)
    return sorted(out)


def _share(items: list[str], rank: int, world: int) -> list[str]:
    # round-robin: every rank hashes about the same number of (similar-sized) shards
    return items[rank::world]


def record_manifest(folder: Path, rank: int, world: int, barrier: Callable[[], None]) -> None:
    """Collective: each rank hashes its share of ``folder``'s files; rank 0 writes the manifest.

    Call after every rank's files are complete (a barrier). Returns after a barrier, with
    ``manifest.json`` complete on disk.
    """
    names = list_files(folder)
    digests = {n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
               for n in _share(names, rank, world)}
    write_json_atomic(folder / f"{_DIGESTS}{rank:05d}.json", digests)
    barrier()
    if rank == 0:
        files: dict[str, Any] = {}
        for r in range(world):
            part = folder / f"{_DIGESTS}{r:05d}.json"
            files.update(json.loads(part.read_text()))
            part.unlink()
        if sorted(files) != names:  # a rank saw another listing: the folder changed meanwhile
            raise LladaError(
                f"{folder} changed while its manifest was written: is another job writing to "
                "this run_dir? Give each job its own run_dir"
            )
        write_json_atomic(folder / MANIFEST, {"format": 1, "algorithm": "sha256", "files": files})
    barrier()


def _first_bad_index(local_bad: int | None, device: torch.device | None) -> int | None:
    """The smallest bad file index over all ranks (None when all are good)."""
    value = -1 if local_bad is None else local_bad
    if dist.is_initialized() and dist.get_world_size() > 1:
        # MIN over (index or a large sentinel) so every rank names the same file
        t = torch.tensor([value if value >= 0 else 2**62], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        value = int(t.item())
        return None if value == 2**62 else value
    return None if value < 0 else value


def verify_manifest(
    folder: Path, rank: int = 0, world: int = 1, device: torch.device | None = None
) -> bool:
    """Refuse (``LladaError``) unless every file of ``folder`` matches its ``manifest.json``.

    Collective when ``world`` > 1: ranks hash disjoint shares and agree on the outcome, so
    no rank goes on to unpickle a file another rank found bad. Returns False when the folder
    has no manifest and ``LLADA_TRUST_UNVERIFIED_CHECKPOINTS=1`` skips this hash check (the
    files still unpickle weights-only: the variable never allows code to run).
    """
    path = folder / MANIFEST
    if not path.exists():
        if os.environ.get(TRUST_ENV) == "1":
            if rank == 0:
                print(f"warning: loading {folder} unverified ({TRUST_ENV}=1): no hash check; "
                      "its files still load weights-only", file=sys.stderr)
            return False
        raise LladaError(
            f"{folder} has no {MANIFEST}, so its files cannot be verified before loading "
            f"(written by an older llada-train, or not a complete checkpoint): if you trust "
            f"every file in it, set {TRUST_ENV}=1 to skip this hash check (files still load "
            "weights-only)"
        )
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise LladaError(
            f"{path} is not a valid checkpoint manifest: restore it from the original "
            "checkpoint or resume from an older one"
        ) from None
    fix = "restore the original checkpoint, or resume from an older one (point latest at it)"
    names = list_files(folder)
    for name in names:
        if name not in files:
            raise LladaError(f"{folder / name} is not in the {MANIFEST} written at save time: "
                             f"remove it, or {fix}")
    for name in sorted(files):
        f = folder / name
        if not f.is_file():
            raise LladaError(f"{f} is listed in {path} but missing: {fix}")
        size = f.stat().st_size
        if size != files[name]["size"]:
            raise LladaError(
                f"{f} is {size} bytes but was {files[name]['size']} when saved (truncated or "
                f"replaced): it does not match the {MANIFEST} written at save time; {fix}"
            )
    mine = set(_share(names, rank, world))
    bad = next((i for i, n in enumerate(names)
                if n in mine and sha256_file(folder / n) != files[n]["sha256"]), None)
    bad = _first_bad_index(bad, device)
    if bad is not None:
        raise LladaError(
            f"{folder / names[bad]} does not match the sha256 in the {MANIFEST} written at save "
            f"time (modified or corrupted since): refusing to load it; {fix}"
        )
    return True
