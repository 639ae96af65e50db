"""Pre-training through the real ``llada-pretrain`` entry point, one process on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from llada_train.model import load_pretrained
from tests.launch_utils import cli, metrics


def data_overrides(demo_data) -> list[str]:
    return [f"data.path={demo_data / 'shards'}", f"data.tokenizer={demo_data / 'tokenizer.json'}"]


FAKE_KEY = "0123456789abcdef" * 2 + "fa11ed00"  # 40 hex characters, like a wandb key


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    # wandb offline, with a key in the environment (where credentials come from), rides on
    # this run for test_wandb_offline_...: a run of its own would be one more start-up
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_API_KEY", FAKE_KEY)
        proc = cli(
            "llada-pretrain",
            [
                f"run_dir={run_dir}",
                *data_overrides(demo_data),
                "trainer.max_steps=30",
                "trainer.seq_len=64",
                "logging.log_every=1",
                "logging.progress_bar=false",
                "logging.wandb_mode=offline",
            ],
        )
    return run_dir, proc


def test_loss_falls_over_30_steps(trained):
    run_dir, _ = trained
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_run_dir_holds_config_metrics_checkpoint_and_export(trained):
    run_dir, proc = trained
    assert "max_steps: 30" in (run_dir / "config.yaml").read_text()
    info = json.loads((run_dir / "run_info.jsonl").read_text().splitlines()[0])
    assert {"git_commit", "git_dirty", "world_size"} <= set(info)
    row = metrics(run_dir)[-1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mem_gib", "skipped_steps"} <= set(row)
    assert "mfu" not in row and "mfu" not in proc.stdout  # meaningless on CPU: neither logged nor printed
    assert row["grad_norm"] > 0 and 0.95 * 30 * 16 * 64 <= row["tokens"] <= 30 * 16 * 64
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000030"
    model = load_pretrained(run_dir / "export")
    assert (run_dir / "export" / "tokenizer.json").exists()
    with torch.no_grad():
        assert model(torch.tensor([[3, 4, 5]])).shape == (1, 3, 512)


def test_plot_draws_the_run_curves(trained):
    run_dir, _ = trained
    cli("llada-plot", [str(run_dir)])
    png = run_dir / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rerun_of_a_finished_run_resumes_instead_of_restarting(trained, demo_data):
    run_dir, _ = trained
    common = [f"run_dir={run_dir}", *data_overrides(demo_data), "trainer.seq_len=64", "logging.progress_bar=false"]
    ckpt_files = sorted((run_dir / "checkpoints").rglob("*"))
    stamps = [f.stat().st_mtime_ns for f in ckpt_files]
    same = cli("llada-pretrain", [*common, "trainer.max_steps=30"])
    assert "at step 30" in same.stdout and "nothing to train" in same.stdout
    assert sorted((run_dir / "checkpoints").rglob("*")) == ckpt_files  # the checkpoint is not rewritten
    assert [f.stat().st_mtime_ns for f in ckpt_files] == stamps
    proc = cli("llada-pretrain", [*common, "trainer.max_steps=32", "logging.log_every=1"])
    assert "resumed from" in proc.stdout and "at step 30" in proc.stdout
    assert [m["step"] for m in metrics(run_dir)][-2:] == [31, 32]


def _one_error_line(proc) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_data_path_is_one_clear_line(tmp_path, demo_data):
    proc = cli(
        "llada-pretrain",
        [f"run_dir={tmp_path / 'r'}", f"data.path={tmp_path / 'nowhere'}",
         f"data.tokenizer={demo_data / 'tokenizer.json'}"],
        check=False,
    )
    assert str(tmp_path / "nowhere") in _one_error_line(proc)


def test_tokenizer_that_does_not_fit_the_model_is_one_clear_line(tmp_path, demo_data):
    proc = cli(
        "llada-pretrain",
        [f"run_dir={tmp_path / 'r'}", *data_overrides(demo_data), "model.vocab_size=300"],
        check=False,
    )
    line = _one_error_line(proc)
    assert "vocab" in line and "512" in line
    assert not (tmp_path / "r" / "run_info.jsonl").exists()  # checked before any set-up


def test_batch_sizes_that_do_not_divide_are_one_clear_line(tmp_path, demo_data):
    proc = cli(
        "llada-pretrain",
        [f"run_dir={tmp_path / 'r'}", *data_overrides(demo_data), "trainer.global_batch_size=10",
         "trainer.micro_batch_size=4"],
        check=False,
    )
    assert "global_batch_size=10" in _one_error_line(proc)
    # found before the process group and the run files: no run_info.jsonl was written
    assert not (tmp_path / "r" / "run_info.jsonl").exists()


def test_config_typo_fails_with_hydras_message(tmp_path):
    proc = cli("llada-pretrain", [f"run_dir={tmp_path / 'r'}", "trainer.max_stepz=3"], check=False)
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override", ["+trainer.max_stepz=3", "+logging.api_key=SECRET-7f3a91"])
def test_keys_appended_past_the_schema_are_refused_before_anything_is_written(tmp_path, override):
    # Hydra's '+' appends a key the schema does not know: a typo would be ignored and a
    # credential written to config.yaml; both must stop with one line, the value nowhere
    run_dir = tmp_path / "r"
    proc = cli("llada-pretrain", [f"run_dir={run_dir}", override], check=False)
    line = _one_error_line(proc)
    assert override[1:].split("=")[0] in line and "is not a setting of" in line
    written = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.exists() else []
    assert not any("SECRET-7f3a91" in p.read_text(errors="ignore") for p in written), written
    assert not (run_dir / "config.yaml").exists() and not (run_dir / ".hydra").exists()


def test_wandb_offline_writes_into_the_run_dir_and_logs_no_secrets(trained):
    run_dir, _ = trained
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (run_dir / "wandb_id.txt").read_text().strip() in runs[0].name
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_scrub_secrets_drops_credentials_but_keeps_token_ids():
    from llada_train.train.metrics import scrub_secrets

    cfg = {"logging": {"wandb_api_key": "abc", "wandb_project": "p", "API_KEY": "k"},
           "model": {"mask_token_id": 2}, "hf_token": "xyz", "token": "t", "password": "pw",
           "data": {"tokenizer": "tok.json", "max_tokens": 5}}
    assert scrub_secrets(cfg) == {"logging": {"wandb_project": "p"}, "model": {"mask_token_id": 2},
                                  "data": {"tokenizer": "tok.json", "max_tokens": 5}}
