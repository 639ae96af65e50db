"""Data pipeline speed, as ratios measured side by side in one run.

    python benchmarks/data_bench.py [--repeat 2] [--rounds 5] [--seconds 2]

1. tokenization: ``llada-tokenize`` (read, encode, shard, checksum, write) vs raw
   ``tokenizers`` ``encode_batch`` (and ``encode_batch_fast``, which the pipeline uses: no
   offsets) on the same documents already in memory, with the same number of workers
   (processes for the pipeline, Rayon threads for the raw call); both run in fresh
   subprocesses with ``RAYON_NUM_THREADS`` = workers; median of alternating rounds.
   Target >= 0.9x.
2. reader: ``build_pretrain_reader`` tokens/s (shuffled windows) vs a raw sequential
   ``np.memmap`` read of the same shards (the tokenized text tiled to 32M tokens) into
   int64 tensors of the same shape; median of 10 alternating rounds. Target >= 0.5x.
3. reader vs the ``tiny`` trainer: forward + backward of ``LLaDAModel(ModelConfig())`` with
   ``PretrainObjective`` on an (8, 128) batch. Target >= 100x.

Text: ../shared/data/tinyshakespeare/input.txt (paragraphs as documents) when present,
else the demo corpus; repeated ``--repeat`` times so timings are not dominated by start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

RAW = """
import json, sys, time
from tokenizers import Tokenizer
sys.path.insert(0, {repo!r})
from data_pipelines.sources import SourceSpec, iter_documents
docs = list(iter_documents(SourceSpec(inputs=[{text!r}], txt_doc="paragraph")))
tok = Tokenizer.from_file({tok!r})
t = time.perf_counter()
encs = tok.{call}(docs, add_special_tokens=False)
n = sum(len(e.ids) for e in encs) + len(docs)  # + one EOS per document
print(json.dumps({{"tokens": n, "seconds": time.perf_counter() - t}}))
"""

PIPE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from data_pipelines.sources import SourceSpec
from data_pipelines.tokenize import tokenize_to_shards
t = time.perf_counter()
m = tokenize_to_shards(SourceSpec(inputs=[{text!r}], txt_doc="paragraph"), {tok!r}, {out!r},
                       shard_tokens=1 << 20, num_workers={w}, overwrite=True, progress=False)
print(json.dumps({{"tokens": m["num_tokens"], "seconds": time.perf_counter() - t}}))
"""


def run_json(code: str, workers: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(workers), "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def prepare_text(tmp: Path, repeat: int) -> tuple[Path, str]:
    if SHAKESPEARE.is_file():
        base, name = SHAKESPEARE.read_text(), "tinyshakespeare"
    else:
        from data_pipelines.demo_corpus import generate_documents

        base, name = "\n\n".join(generate_documents(6000)), "demo corpus"
    text = tmp / "text.txt"
    text.write_text("\n\n".join([base] * repeat))
    return text, name


def bench_tokenize(
    tmp: Path, text: Path, tok: str, workers: int, rounds: int
) -> list[tuple[float, str, float, float]]:
    """Per raw call: (pipeline tokens/s, call, raw tokens/s, ratio), medians over alternating rounds."""
    per: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):  # alternate so load from other processes hits both alike
        out = str(tmp / f"sh{workers}")
        pipe = run_json(
            PIPE.format(repo=str(REPO), text=str(text), tok=tok, out=out, w=workers), workers
        )
        for call in (
            "encode_batch",
            "encode_batch_fast",
        ):  # each in a fresh process, like the pipeline
            raw = run_json(RAW.format(repo=str(REPO), text=str(text), tok=tok, call=call), workers)
            assert raw["tokens"] == pipe["tokens"], (raw, pipe)
            rates = (pipe["tokens"] / pipe["seconds"], raw["tokens"] / raw["seconds"])
            per.setdefault(call, []).append(rates)
    rows = []
    for call, pairs in per.items():
        a, b = np.array(pairs).T
        rows.append((float(np.median(a)), call, float(np.median(b)), float(np.median(a / b))))
    return rows


def timed_rate(fn, seconds: float) -> float:
    """Tokens per second of repeated ``fn()`` (returns tokens) over about ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def big_shards(small: Path, out: Path, min_tokens: int) -> Path:
    """The tokenized text tiled to >= ``min_tokens`` in 4M-token shards (larger than CPU caches)."""
    from data_pipelines.shards import shard_name, write_array_atomic
    from llada_train.atomic import write_json_atomic

    m = json.loads((small / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(small / s["file"], dtype=m["dtype"]) for s in m["shards"]])
    stream = np.tile(stream, -(-min_tokens // len(stream)))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, a in enumerate(range(0, len(stream), 1 << 22)):
        write_array_atomic(out / shard_name(k), stream[a : a + (1 << 22)])
        rows.append({"file": shard_name(k), "num_tokens": len(stream[a : a + (1 << 22)])})
    write_json_atomic(out / "manifest.json", {**m, "shards": rows, "num_tokens": len(stream)})
    return out


def bench_reader(shards: Path, B: int, L: int, seconds: float) -> tuple[float, float, float]:
    """(reader tokens/s, raw sequential memmap tokens/s, median ratio) for (B, L) batches.

    The two alternate in short rounds so load from other processes hits both alike.
    """
    import torch

    from llada_train.data import PretrainDataConfig, build_pretrain_reader

    m = json.loads((shards / "manifest.json").read_text())
    maps = [np.memmap(shards / s["file"], dtype=m["dtype"], mode="r") for s in m["shards"]]
    pos = [0, 0]

    def raw() -> int:  # sequential sweep over every shard, same output type and shape
        k, i = pos
        if i + B * L > len(maps[k]):
            k, i = (k + 1) % len(maps), 0
        x = torch.from_numpy(maps[k][i : i + B * L].astype(np.int64).reshape(B, L))
        pos[:] = [k, i + B * L]
        return x.numel()

    cfg = PretrainDataConfig(path=str(shards), tokenizer=None)
    reader, _ = build_pretrain_reader(cfg, L, B, 0, 0, 1)
    ours = lambda: next(reader)["input_ids"].numel()  # noqa: E731
    timed_rate(raw, 0.3), timed_rate(ours, 0.3)  # warm-up: page cache, maps
    rounds = [(timed_rate(ours, seconds / 10), timed_rate(raw, seconds / 10)) for _ in range(10)]
    a, b = np.array(rounds).T
    return float(np.median(a)), float(np.median(b)), float(np.median(a / b))


def bench_trainer(seconds: float) -> float:
    """Tokens/s the tiny model consumes: forward + backward of the pretrain objective on (8, 128)."""
    import torch

    from llada_train.diffusion import PretrainObjective
    from llada_train.diffusion.losses import ObjectiveConfig
    from llada_train.model import LLaDAModel, ModelConfig

    cfg = ModelConfig()
    model = LLaDAModel(cfg)
    obj = PretrainObjective(ObjectiveConfig(), cfg.mask_token_id)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, cfg.vocab_size, (8, 128), generator=gen)}

    def step() -> int:
        model.zero_grad(set_to_none=True)
        obj(model, batch, gen).loss.backward()
        return batch["input_ids"].numel()

    return timed_rate(step, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="copies of the text to tokenize")
    ap.add_argument("--rounds", type=int, default=5, help="alternating tokenization rounds")
    ap.add_argument(
        "--seconds", type=float, default=2.0, help="time per reader/trainer measurement"
    )
    ap.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=None,
        help="worker counts (default 1 and all cores)",
    )
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from data_pipelines.sources import default_workers
    from data_pipelines.train_tokenizer import save_tokenizer, train_bpe

    workers = a.workers or sorted({1, default_workers()})
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        text, name = prepare_text(tmp, a.repeat)
        tok = str(save_tokenizer(train_bpe([text], vocab_size=4096), tmp / "tok"))
        print(
            f"text: {name} x{a.repeat} ({text.stat().st_size / 1e6:.1f} MB), byte-level BPE vocab 4096",
            flush=True,
        )
        for w in workers:
            for pipe, call, rate, ratio in bench_tokenize(tmp, text, tok, w, a.rounds):
                what = f"tokenize, {w} worker(s)"
                rows.append((what, pipe, f"raw {call}, {w} thread(s)", rate, ratio, 0.9))
        shards = big_shards(tmp / f"sh{workers[-1]}", tmp / "big", 32 << 20)
        for B, L in [(8, 128), (4, 4096)]:
            rd, raw, ratio = bench_reader(shards, B, L, a.seconds)
            rows.append((f"reader ({B}, {L})", rd, "raw sequential np.memmap", raw, ratio, 0.5))
        rd8 = rows[-2][1]
        trainer = bench_trainer(a.seconds)
        what = "reader (8, 128) vs tiny trainer"
        rows.append((what, rd8, "tiny fwd+bwd (8, 128)", trainer, rd8 / trainer, 100.0))
    head = f"{'measurement':32} {'ours tok/s':>13} {'reference':36} {'ref tok/s':>13} {'ratio':>9}"
    print(f"\n{head} {'target':>8}")
    for what, ours, ref_name, ref, ratio, target in rows:
        ok = "ok" if ratio >= target else "MISS"
        print(
            f"{what:32} {ours:13,.0f} {ref_name:36} {ref:13,.0f} {ratio:8.2f}x >={target:g}x {ok}"
        )


if __name__ == "__main__":
    main()
