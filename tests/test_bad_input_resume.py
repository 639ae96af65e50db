"""Resuming on a world size the checkpoint cannot continue on (ZeRO-1/2/3 partition optimizer
state by rank) is one line, found before any process group from ``trainer_state.json`` alone;
a damaged ``trainer_state.json`` is one line too."""

from __future__ import annotations

import json

import pytest

from llada_train.errors import LladaError
from llada_train.train.checkpointing import check_resume_world_size
from tests.launch_utils import cli

TAG = "step_00000002"


def checkpoint(run_dir, **state) -> None:
    """A checkpoint folder holding only what the start-up check reads."""
    step = run_dir / "checkpoints" / TAG
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, **state}))
    (run_dir / "checkpoints" / "latest").write_text(TAG)


def refusal(run_dir, saved: int, world: int) -> str:
    return (
        f"{run_dir / 'checkpoints' / TAG} was written by {saved} ranks but this job has {world}: "
        "resume with the same number of ranks (ZeRO-1/2/3 keep optimizer state partitioned by "
        "rank; a ZeRO-0 checkpoint with keyed masks may change it)"
    )


@pytest.mark.parametrize("zero_stage,masks,world,allowed", [
    (2, "seed-step-index", 2, True),   # same world size
    (0, "seed-step-index", 4, True),   # ZeRO-0 with keyed masks moves
    (1, "seed-step-index", 4, False),  # partitioned optimizer state
    (3, "seed-step-index", 1, False),
    (0, None, 4, False),               # masks drawn per rank before keyed masks existed
])
def test_which_world_sizes_a_checkpoint_resumes_on(tmp_path, zero_stage, masks, world, allowed):
    state = {"world_size": 2, "zero_stage": zero_stage}
    if masks:
        state["mask_draws"] = masks
    checkpoint(tmp_path, **state)
    if allowed:
        assert check_resume_world_size(tmp_path, TAG, world)["step"] == 2
    else:
        with pytest.raises(LladaError) as err:
            check_resume_world_size(tmp_path, TAG, world)
        assert str(err.value) == refusal(tmp_path, 2, world)


def test_damaged_trainer_state_is_one_line(tmp_path):
    checkpoint(tmp_path)
    state = tmp_path / "checkpoints" / TAG / "trainer_state.json"
    state.write_text('{"step": 2, "world')
    with pytest.raises(LladaError, match=rf"^{state} cannot be read \(.*\): the checkpoint is "
                       r"damaged; point .*checkpoints/latest at an older complete step$"):
        check_resume_world_size(tmp_path, TAG, 1)


def test_the_entry_point_refuses_before_any_process_group(tmp_path, demo_data):
    run_dir = tmp_path / "run"
    checkpoint(run_dir, world_size=2, zero_stage=2, mask_draws="seed-step-index")
    proc = cli("llada-pretrain", [f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
                                  f"data.tokenizer={demo_data / 'tokenizer.json'}"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == f"error: {refusal(run_dir, 2, 1)}"
    assert not (run_dir / "run_info.jsonl").exists()  # rank 0 writes it after the process group
