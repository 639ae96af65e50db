"""Pre-training reader: window contents, epoch coverage across ranks x workers, shuffle, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_train.data import PretrainDataConfig, SourceConfig, build_pretrain_reader
from llada_train.data.pretrain import document_ids
from llada_train.data.stream import Schedule, StreamState, plan_steps, walk
from llada_train.errors import LladaError
from llada_train.keyed_random import permute
from tests.conftest_data import counting_shards, run_py, write_shard_set

L = 16


def cfg_for(path, **kw) -> PretrainDataConfig:
    return PretrainDataConfig(path=str(path), tokenizer=None, **kw)


def window_ids(batch: torch.Tensor) -> list[int]:
    """Counting shards: row = arange(w*L, (w+1)*L), so the first token names the window."""
    ids = batch[:, 0] // L
    assert torch.equal(batch, (ids[:, None] * L + torch.arange(L)))  # each row is one whole window
    return ids.tolist()


def test_permutation_is_a_bijection_and_seeded():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        assert sorted(permute(np.arange(n), n, key=11).tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))


def test_windows_span_shards_and_drop_the_tail(tmp_path):
    # 3 shards of 50, 7, 60 tokens: 117 tokens -> 7 windows of 16 (5 tokens of tail unused)
    counting_shards(tmp_path / "s", [50, 7, 60])
    r, info = build_pretrain_reader(
        cfg_for(tmp_path / "s"), L, micro_batch_size=7, seed=0, rank=0, world_size=1
    )
    assert r.sched.sizes == [7] and info.vocab_size == 117
    assert info.num_records is None and len(info.manifests) == 1  # a token stream, one source
    seen = window_ids(next(r)["input_ids"])  # window 3 = tokens 48..63 spans all three shards
    assert sorted(seen) == list(range(7)) and r.epoch == 1


@pytest.mark.parametrize("ranks,batch", [(1, 4), (2, 3), (3, 5), (4, 2)])
def test_every_window_once_per_epoch_over_ranks(ranks, batch):
    n = 101
    sched = Schedule([n], [1.0], seed=3)
    steps = 3 * n // (batch * ranks) + 1  # three epochs and a bit
    per_epoch: dict[int, list[int]] = {}
    for rank in range(ranks):
        it = walk(sched, StreamState(0, [0]), batch, ranks, rank)
        items = np.concatenate(
            [plan.items for plan in itertools.islice(it, -(-steps // plan_steps(batch, ranks)))]
        )
        for j in range(steps):  # step j, rank r: global positions j*B*R + r*B + (0..B-1)
            first = j * batch * ranks + rank * batch
            for i, item in enumerate(items[j].tolist()):
                per_epoch.setdefault((first + i) // n, []).append(item)
    for e in range(3):
        assert sorted(per_epoch[e]) == list(range(n)), f"epoch {e}"
    assert per_epoch[0] != per_epoch[1]  # reshuffled by epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("ranks,workers", [(2, 2), (1, 3)])
def test_dataloader_workers_match_in_process_order_and_cover_epoch(tmp_path, ranks, workers):
    counting_shards(tmp_path / "s", [400, 400, 333])  # 1133 tokens: 70 windows
    steps = 70 // (5 * ranks)
    got = {}
    for nw in (0, workers):
        readers = [
            build_pretrain_reader(
                cfg_for(tmp_path / "s", num_workers=nw), L, 5, seed=9, rank=r, world_size=ranks
            )[0]
            for r in range(ranks)
        ]
        got[nw] = [[window_ids(next(rd)["input_ids"]) for _ in range(steps)] for rd in readers]
        for rd in readers:
            rd.close()
    assert got[0] == got[workers]
    flat = [w for rank in got[workers] for b in rank for w in b]
    assert sorted(flat) == list(range(70))


def test_seed_changes_order_deterministically(tmp_path):
    counting_shards(tmp_path / "s", [1000])

    def first(seed):
        r, _ = build_pretrain_reader(cfg_for(tmp_path / "s"), L, 8, seed=seed, rank=0, world_size=1)
        return window_ids(next(r)["input_ids"])

    assert first(1) == first(1) and first(1) != first(2)


RESUME_SCRIPT = """
import json, sys, torch
from llada_train.data import PretrainDataConfig, SourceConfig, build_pretrain_reader
for a in json.loads(sys.argv[1]):
    cfg = PretrainDataConfig(path=a["path"], tokenizer=None, num_workers=a["nw"],
                             sources=[SourceConfig(**s) for s in a["sources"]])
    r, _ = build_pretrain_reader(cfg, a["L"], a["B"], seed=5, rank=a["rank"], world_size=a["world"])
    r.load_state_dict(json.load(open(a["state"])))
    out = [next(r)["input_ids"].tolist() for _ in range(a["n"])]
    r.close()
    json.dump(out, open(a["out"], "w"))
"""


def test_resume_in_fresh_process_gives_identical_batches(tmp_path):
    counting_shards(tmp_path / "a", [300, 245])
    counting_shards(tmp_path / "b", [200], offset=1_000_000)
    jobs, expected = [], []
    for name, sources in [
        ("single", []),
        (
            "mixture",
            [
                {"path": str(tmp_path / "a"), "weight": 0.7},
                {"path": str(tmp_path / "b"), "weight": 0.3},
            ],
        ),
    ]:
        cfg = cfg_for(tmp_path / "a", sources=[SourceConfig(**s) for s in sources])
        r, _ = build_pretrain_reader(cfg, L, 4, seed=5, rank=1, world_size=2)
        for _ in range(13):  # past the end of the first epoch of the smaller source
            next(r)
        (tmp_path / f"{name}.json").write_text(json.dumps(r.state_dict()))
        expected.append([next(r)["input_ids"].tolist() for _ in range(10)])
        jobs.append(
            {
                "path": str(tmp_path / "a"),
                "sources": sources,
                "L": L,
                "B": 4,
                "rank": 1,
                "world": 2,
                "nw": 2,
                "state": str(tmp_path / f"{name}.json"),
                "out": str(tmp_path / f"{name}.out"),
                "n": 10,
            }
        )
    run_py(["-c", RESUME_SCRIPT, json.dumps(jobs)])  # fresh process, with 2 dataloader workers
    for job, expect in zip(jobs, expected, strict=True):
        assert json.loads(Path(job["out"]).read_text()) == expect, job["sources"]


def test_resume_with_another_world_size_continues_without_gap_or_overlap(tmp_path):
    counting_shards(tmp_path / "s", [64 * L])  # 64 windows
    cfg = cfg_for(tmp_path / "s")
    old = [build_pretrain_reader(cfg, L, 4, seed=1, rank=r, world_size=2)[0] for r in range(2)]
    seen = [
        w for _ in range(3) for rd in old for w in window_ids(next(rd)["input_ids"])
    ]  # 24 windows
    state = old[0].state_dict()
    assert state == old[1].state_dict() and state["position"] == 24
    new, _ = build_pretrain_reader(cfg, L, 10, seed=1, rank=0, world_size=1)
    new.load_state_dict(state)
    seen += [w for _ in range(4) for w in window_ids(next(new)["input_ids"])]
    assert sorted(seen) == list(range(64)) and new.epoch == 1


def test_mixture_weights_and_per_source_coverage(tmp_path):
    counting_shards(tmp_path / "web", [100 * L])
    counting_shards(tmp_path / "code", [30 * L], offset=10_000_000)
    counting_shards(tmp_path / "math", [10 * L], offset=20_000_000)
    srcs = [
        SourceConfig(str(tmp_path / "web"), 0.7),
        SourceConfig(str(tmp_path / "code"), 0.2),
        SourceConfig(str(tmp_path / "math"), 0.1),
    ]
    r, info = build_pretrain_reader(
        PretrainDataConfig(path="", tokenizer=None, sources=srcs),
        L,
        50,
        seed=0,
        rank=0,
        world_size=1,
    )
    first = torch.cat([next(r)["input_ids"][:, 0] for _ in range(200)])  # 10,000 samples
    src = (first // 10_000_000).numpy()
    counts = np.bincount(src, minlength=3)
    for c, w in zip(counts, (0.7, 0.2, 0.1), strict=True):  # binomial: within 5 sigma
        assert abs(c - w * 10_000) < 5 * np.sqrt(10_000 * w * (1 - w))
    math_windows = ((first[src == 2] - 20_000_000) // L).tolist()
    for e in range(len(math_windows) // 10):  # each pass over "math" reads its 10 windows once
        assert sorted(math_windows[10 * e : 10 * e + 10]) == list(range(10))
    assert r.state_dict()["counters"] == counts.tolist()
    assert len(info.manifests) == 3  # one manifest per source, beside the reader


# ---- document-masked packing (data.document_mask) ----------------------------------------
EOS = 1


def test_document_ids_start_a_new_document_after_each_eos():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    # the EOS belongs to the document it ends; an empty document is just its EOS
    assert document_ids(x, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]


def test_reader_emits_document_ids_when_asked(tmp_path):
    stream = np.array([5, 6, EOS, 7, 8, 9, EOS, 4] * 4)  # 32 tokens: 4 windows of 8
    write_shard_set(tmp_path / "s", [stream], vocab_size=40)
    cfg = PretrainDataConfig(path=str(tmp_path / "s"), tokenizer=None, document_mask=True)
    reader, _ = build_pretrain_reader(cfg, 8, 2, seed=0, rank=0, world_size=1, eos_token_id=EOS)
    batch = next(reader)
    assert batch["document_ids"].dtype == torch.int64
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]] * 2
    with pytest.raises(LladaError, match="eos_token_id"):
        build_pretrain_reader(cfg, 8, 2, seed=0, rank=0, world_size=1)
