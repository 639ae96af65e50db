"""``llada-rl`` (ESPO) end to end, launched as users launch it.

- One ZeRO-2 run of 3 steps with mu = 2 (two rounds of rollouts) serves: the metrics, the
  policy equal to the reference at step 1 (KL 0, ratio 1), and two resumes in other processes,
  one inside a round (its rollouts come from the checkpoint) and one at a round's start (the
  keyed rollout RNG draws them again): both redo the steps exactly.
- Two ranks under ZeRO-3 with LoRA and the adapters-off reference, resumed the same way.
- The 20-step wiring smoke on the shared GSM8K sample, with the shipped GSM8K rewards.
- Bad runs stop with one line.

The one-rank launches (the ZeRO-2 run and its resumes, the smoke, the bad runs) share one
import (``tests/forked_launches.py``): each is still its own
process from ``main()`` on to the interpreter's end.

The rewards of an untrained model are noise, so the runs score word-count parity
(``tests/rl_rewards.py``, a plug-in by dotted path): its groups have a spread to train on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from tests.forked_launches import forked_launches
from tests.launch_utils import branch_at, metrics, run, torchrun_cmd
from tests.model_utils import save_tiny_model

pytestmark = pytest.mark.slow
COMPARED = ("loss", "grad_norm", "rl/reward_mean", "rl/accuracy", "espo/kl", "espo/ratio_mean")
PARITY_REWARD = "data.rewards=[{path:'tests.rl_rewards:odd_word_count',weight:1.0}]"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "base", n_layers=2,
                           max_sequence_length=512)  # fmt: skip


def rl_args(run_dir: Path, base: Path, demo_data: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"init_from={base}",
        f"data.path={demo_data / 'rl_prompts.jsonl'}",
        "data.limit=64",  # the 3000 prompts are rendered at every start; a few rounds use 64
        f"data.tokenizer={demo_data / 'tokenizer.json'}",
        PARITY_REWARD,
        "objective.group_size=4",
        "objective.inner_iterations=2",
        "objective.elbo_timesteps=2",
        "objective.loss_chunk_rows=64",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=4",
        "trainer.seq_len=160",
        "trainer.keep_last=10",
        "trainer.export_at_end=false",
        "schedule.peak_lr=3e-3",
        "schedule.warmup_steps=1",
        "decode.gen_length=8",
        "decode.steps=8",
        "decode.block_length=8",
        "deepspeed=zero2",
        "logging.log_every=1",
        "logging.progress_bar=false",
        *extra,
    ]


def assert_same_steps(again: list[dict], full: list[dict], first: int) -> None:
    by_step = {m["step"]: m for m in full}
    assert [m["step"] for m in again] == list(range(first, len(full) + 1))
    for m in again:
        for key in COMPARED:
            assert m[key] == pytest.approx(by_step[m["step"]][key], rel=1e-6, abs=1e-7), (m["step"], key)


def test_espo_trains_logs_its_metrics_and_resumes_exactly_inside_and_across_rounds(one_rank):
    runs, results = one_rank
    full = runs["full"]
    code, out = results["full"]
    assert code == 0, out[-3000:]
    rows = metrics(full)
    print("ESPO losses:", [round(m["loss"], 5) for m in rows])
    for key in (*COMPARED, "rl/reward_std", "rl/response_length", "rl/rollout_s",
                "espo/clip_fraction", "espo/zero_std_groups"):  # fmt: skip
        assert all(key in m for m in rows), key
    first = rows[0]
    assert first["espo/kl"] < 1e-8 and first["espo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["rl/rollout_s"] > 0 and rows[1]["rl/rollout_s"] == 0.0  # round 0 reused at step 2
    assert rows[2]["rl/rollout_s"] > 0  # round 1 sampled at step 3
    assert any(m["espo/zero_std_groups"] < 2 for m in rows)  # groups with a spread trained
    assert rows[1]["espo/ratio_mean"] != pytest.approx(1.0, abs=1e-7)  # old != current in round 0
    for step, name in ((1, "inside"), (2, "across")):
        code, out = results[name]
        assert code == 0 and "resumed from" in out, out[-3000:]
        assert_same_steps(metrics(runs[name]), rows, step + 1)


def test_espo_on_two_ranks_under_zero3_with_lora_and_the_adapters_off_reference(
    base, demo_data, tmp_path
):
    full = tmp_path / "full"
    extra = ["deepspeed=zero3", "peft=lora", "objective.reference=lora_base",
             "trainer.micro_batch_size=1", "trainer.max_steps=3"]  # fmt: skip
    run(torchrun_cmd("llada_train.cli.rl", rl_args(full, base, demo_data, *extra,
                                                   "trainer.save_every=1")))  # fmt: skip
    rows = metrics(full)
    assert len(rows) == 3 and rows[0]["espo/kl"] < 1e-8  # adapters start at zero: base = policy
    assert rows[1]["espo/kl"] > 0  # the adapters moved
    resumed = branch_at(full, 1, tmp_path / "resumed", with_metrics=False)
    proc = run(torchrun_cmd("llada_train.cli.rl", rl_args(resumed, base, demo_data, *extra)))
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_steps(metrics(resumed), rows, 2)


def gsm8k_args(run_dir: Path, base: Path, demo_data: Path, shared_data: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"init_from={base}", "data=gsm8k_rl",
        f"data.path={shared_data / 'gsm8k' / 'train.jsonl'}", "data.limit=40",
        f"data.tokenizer={demo_data / 'tokenizer.json'}", "trainer.seq_len=512",
        "trainer.max_steps=20", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
        "trainer.export_at_end=false", "objective.group_size=2", "objective.inner_iterations=4",
        "decode.gen_length=16", "decode.steps=8", "decode.block_length=16",
        "logging.progress_bar=false", "logging.log_every=1",
    ]  # fmt: skip


def test_gsm8k_wiring_smoke_twenty_steps(one_rank, shared_data):
    """The GSM8K recipe's data, rewards and sampler on the tiny model (no learning expected)."""
    runs, results = one_rank
    code, out = results["gsm8k"]
    assert code == 0, out[-3000:]
    rows = metrics(runs["gsm8k"])
    assert [m["step"] for m in rows] == list(range(1, 21))
    assert sum(m["rl/rollout_s"] > 0 for m in rows) == 5  # one round of rollouts per 4 steps
    assert all(0.0 <= m["rl/reward_mean"] <= 1.1 for m in rows)  # exact match + 0.1 format


# bad configs that stop before any process group: (overrides, the text of the error line)
START_FAILURES = [
    (["objective.group_size=1"], "objective.group_size=1: use >= 2"),
    (["data.rewards=[{path:'no_such_module:f'}]"],
     "reward 'no_such_module:f' does not import (ModuleNotFoundError"),
    (["objective.reference=lora_base"],
     "objective.reference=lora_base is the LoRA base with the adapters off: set peft=lora"),
    (["decode=hex"], "decode=hex gives texts, not one token canvas per row"),
    (["decode.gen_length=200"], "decode.gen_length=200 leaves no room for prompts"),
]  # fmt: skip


def assert_one_line(code: int, out: str, message: str) -> None:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], out[-2000:]
    assert "Traceback" not in out


@pytest.fixture(scope="module")
def one_rank(base, demo_data, tmp_path_factory):
    """Every one-rank launch of this module, each from ``main()`` on in its own process, all
    after one import (``forked_launches``): (run dirs, results) by name. In order: the bad runs
    (START_FAILURES as ``bad<i>``, a reference of another architecture as ``other``, a reward
    that raises), the GSM8K smoke (with ``../shared/data``), the ZeRO-2 run of 3 steps saving
    each (step 1 samples round 0, step 2 reuses it, step 3 samples round 1) and its resumes from
    step 1 (inside a round) and step 2 (across), each on a ``branch_at`` copy of its checkpoint."""
    tmp = tmp_path_factory.mktemp("rl")
    runs, cases = {}, {}
    for i, (extra, _) in enumerate(START_FAILURES):
        args = rl_args(tmp / f"bad{i}", base, demo_data, "trainer.max_steps=1", *extra)
        if "decode=hex" in extra:  # hex has its own step settings
            args = [a for a in args if not a.startswith(("decode.steps", "decode.block_length"))]
        cases[f"bad{i}"] = {"argv": args}
    runs["other"] = save_tiny_model(tmp / "other", n_layers=3, max_sequence_length=512)
    cases["other"] = {"argv": rl_args(tmp / "other_run", base, demo_data, "trainer.max_steps=1",
                                      f"objective.reference_path={runs['other']}")}  # fmt: skip
    # the reward runs only on the first rollout, after the process group
    cases["raises"] = {"argv": rl_args(tmp / "raises", base, demo_data, "trainer.max_steps=1",
                                       "data.rewards=[{path:'tests.rl_rewards:raises'}]")}  # fmt: skip
    if SHARED_DATA.is_dir():  # else its test skips (the shared_data fixture)
        runs["gsm8k"] = tmp / "gsm8k"
        cases["gsm8k"] = {"argv": gsm8k_args(runs["gsm8k"], base, demo_data, SHARED_DATA)}
    runs["full"] = tmp / "full"
    cases["full"] = {"argv": rl_args(runs["full"], base, demo_data, "trainer.max_steps=3",
                                     "trainer.save_every=1")}  # fmt: skip
    for step, name in ((1, "inside"), (2, "across")):
        runs[name] = tmp / name
        cases[name] = {"argv": rl_args(runs[name], base, demo_data, "trainer.max_steps=3"),
                       "branch": [str(runs["full"]), step, str(runs[name])]}  # fmt: skip
    results = forked_launches("llada_train.cli.rl", list(cases.values()), tmp / "logs")
    return runs, dict(zip(cases, results, strict=True))


@pytest.mark.parametrize(("case", "message"), [(i, m) for i, (_, m) in enumerate(START_FAILURES)],
                         ids=[" ".join(e) for e, _ in START_FAILURES])  # fmt: skip
def test_bad_rl_runs_are_one_line(one_rank, case, message):
    assert_one_line(*one_rank[1][f"bad{case}"], message)


def test_a_reward_that_raises_stops_the_run_with_one_line(one_rank):
    """The reward runs only on the first rollout, after the process group: a launch from
    ``main()`` on to the interpreter's end."""
    assert_one_line(*one_rank[1]["raises"], "reward tests.rl_rewards:raises failed on ")


def test_a_reference_of_another_architecture_is_refused(one_rank):
    runs, results = one_rank
    code, out = results["other"]
    assert code == 2 and f"error: reference model {runs['other']} differs from the policy in n_layers" in out
