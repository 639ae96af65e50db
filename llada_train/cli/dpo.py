"""``llada-dpo``: VRPO preference optimisation (LLaDA 1.5) from Hydra config ``conf/dpo.yaml``.

The SFT run's loop, checkpoints, resume, DeepSpeed and LoRA; only the data (preference
pairs of ``llada-preference-data``) and the objective (``objective=vrpo``) differ.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llada_train.cli.common import ReaderRequest, check_post_training, run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
from llada_train.data import SFTDataConfig
from llada_train.data.preference import build_preference_reader, check_preference_data
from llada_train.data.stream import Reader, ReaderInfo
from llada_train.model.config import ModelConfig
from llada_train.train.loop import TrainResult

register_configs()


def preference_reader(
    data_cfg: SFTDataConfig, model_cfg: ModelConfig, req: ReaderRequest
) -> tuple[Reader, ReaderInfo]:
    """Batches of ``micro_batch_size`` pairs for this rank (2 rows per pair)."""
    return build_preference_reader(
        data_cfg,
        req.micro_batch_size,
        req.seed,
        req.rank,
        req.world_size,
        model_cfg.eos_token_id,
        model_cfg.vocab_size,
    )


def dpo_checks(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """Start checks run by ``preflight``: the policy's weights, the reference mode, the data."""
    check_post_training(cfg, "llada-dpo", "vrpo", "align")
    check_preference_data(cfg.data, model_cfg.vocab_size, model_cfg.max_sequence_length)


def run_dpo(cfg: DictConfig) -> TrainResult:
    """Train VRPO from ``cfg`` after the DPO checks."""
    return run_training(cfg, preference_reader, check=dpo_checks)


main = hydra_entry("dpo", run_dpo)


if __name__ == "__main__":
    main()
