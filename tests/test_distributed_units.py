"""Unit-level multi-rank checks on 2 real gloo ranks in-process (tests/dist_utils.py):
the collectives the trainer agrees with, and reader sharding against a 1-rank reader."""

from __future__ import annotations

import pytest
import torch

from llada_train.data import PretrainDataConfig, build_pretrain_reader
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def _collectives() -> None:
    import torch.distributed as dist

    from llada_train.train.distributed import all_ranks_any, all_ranks_sum

    rank = dist.get_rank()
    cpu = torch.device("cpu")
    assert all_ranks_any(rank == 1, cpu) is True  # one rank says yes: every rank hears it
    assert all_ranks_any(False, cpu) is False
    summed = all_ranks_sum(torch.tensor([1.0 + rank, 10.0 * rank]))
    assert summed.tolist() == [3.0, 10.0]  # (1 + 2, 0 + 10) by hand


def test_all_ranks_collectives_on_two_ranks():
    run_distributed(_collectives)


def _reader_windows(rank: int, world: int, data_path: str, steps: int) -> list[list[int]]:
    reader, _ = build_pretrain_reader(
        PretrainDataConfig(path=data_path, tokenizer=None), seq_len=32, micro_batch_size=2, seed=3,
        rank=rank, world_size=world,
    )
    rows: list[list[int]] = []
    for _ in range(steps):
        rows.extend(next(reader)["input_ids"].tolist())
    return rows


def _sharded_reader(data_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    rows = _reader_windows(rank, 2, data_path, steps=3)
    torch.save(rows, f"{out_dir}/rank{rank}.pt")


def test_two_ranks_read_disjoint_halves_of_the_one_rank_stream(demo_data, tmp_path):
    run_distributed(_sharded_reader, args=(str(demo_data / "shards"), str(tmp_path)))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # 2 ranks x 3 micro-batches x 2 rows = the first 12 windows a single rank would read
    single = _reader_windows(0, 1, str(demo_data / "shards"), steps=6)
    union = sorted(map(tuple, per_rank[0] + per_rank[1]))
    assert not set(map(tuple, per_rank[0])) & set(map(tuple, per_rank[1]))
    assert union == sorted(map(tuple, single))
