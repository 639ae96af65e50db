"""The trainer's small parts on their own: pre-emption flag, guard, optimizer skip, meter, scrub."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from hydra import compose, initialize_config_dir

from llada_train.config import CONF_DIR, register_configs, to_container
from llada_train.errors import LladaError
from llada_train.train.guard import BadStepCounter, StepSums
from llada_train.train.metrics import ThroughputMeter, flops_per_token, scrub_secrets
from llada_train.train.optim import OptimConfig, build_optimizer
from llada_train.train.preemption import PreemptionFlag


def test_preemption_flag_remembers_a_signal_and_uninstalls():
    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptionFlag.install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill returns
        assert flag.requested and flag.received == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM no longer kills: it is remembered too
        assert flag.received == [signal.SIGUSR1, signal.SIGTERM]
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_step_sums_flag_a_nonfinite_loss_or_norm_without_dropping_counts():
    sums = StepSums(torch.device("cpu"))
    sums.add(torch.tensor(2.0), 10)
    sums.add(torch.tensor(4.0), 6)
    v = sums.agree(stop_requested=False)  # one process: the all-reduce is the identity
    assert (v.nonfinite, v.mean_loss, v.tokens, v.stop_requested) == (False, 3.0, 16.0, False)
    sums.add(torch.tensor(float("inf")), 4)
    assert sums.agree(stop_requested=True).nonfinite
    clean = StepSums(torch.device("cpu"))
    clean.add(torch.tensor(1.0), 1)
    clean.flag_nonfinite(torch.tensor(float("nan")))  # a finite loss with a NaN gradient norm
    verdict = clean.agree(stop_requested=True)
    assert verdict.nonfinite and verdict.stop_requested


def test_bad_step_counter_counts_and_halts_after_k_in_a_row():
    c = BadStepCounter(max_in_a_row=3, skipped=4)  # resumed with 4 earlier skips
    for bad in (True, True, False, True, True):
        c.record(bad, step=7)
    assert (c.skipped, c.in_a_row) == (8, 2)
    with pytest.raises(LladaError, match="3 non-finite steps in a row after step 7"):
        c.record(True, step=7)


def test_skipped_optimizer_step_changes_no_weight_or_state():
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # a real step: moments exist, weights moved
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.skip = True
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters(), strict=True))
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices only


def test_throughput_meter_reports_mfu_only_when_given_flops(monkeypatch):
    from llada_train.model.config import ModelConfig

    clock = iter([0.0, 2.0, 2.0, 6.0])
    monkeypatch.setattr("llada_train.train.metrics.time.perf_counter", lambda: next(clock))
    cpu = ThroughputMeter(global_batch_size=8, world_size=2)  # CPU: no FLOPs, no MFU
    assert cpu.report(step=4, tokens=1000.0) == {
        "tokens_per_s": 500.0, "samples_per_s": 16.0, "step_time_s": 0.5,
    }
    fpt = flops_per_token(ModelConfig(), 128)
    cuda = ThroughputMeter(global_batch_size=8, world_size=2, flops_per_token=fpt, peak_flops_per_device=1e12)
    row = cuda.report(step=2, tokens=400.0)  # 4 s window: 100 tokens/s over 2 devices
    assert row["mfu"] == pytest.approx(100.0 * fpt / 2e12)


def _wsd_pretrain_config() -> dict:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="pretrain", overrides=["schedule=wsd", "logging=wandb"])
    return to_container(cfg)


def test_scrub_secrets_keeps_a_wsd_schedule_and_drops_credentials():
    cfg = _wsd_pretrain_config()
    cfg["logging"]["wandb_api_key"] = "wandb-secret-value"  # what a careless override would add
    cfg["hf_token"] = "hf-secret-value"
    clean = scrub_secrets(cfg)
    for key in ("drop_at_tokens", "decay_tokens", "total_tokens", "peak_lr"):
        assert clean["schedule"][key] == cfg["schedule"][key], key
    assert clean["data"]["tokenizer"] == cfg["data"]["tokenizer"]
    assert clean["model"]["mask_token_id"] == cfg["model"]["mask_token_id"]
    assert "wandb_api_key" not in clean["logging"] and "hf_token" not in clean
    assert "secret-value" not in repr(clean)
