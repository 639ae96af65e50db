"""``llada-pretrain``: masked-diffusion pre-training from Hydra config ``conf/pretrain.yaml``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llada_train.cli.common import run_training
from llada_train.config import CONF_DIR, register_configs
from llada_train.data import build_pretrain_reader, check_vocab
from llada_train.model.config import ModelConfig

register_configs()


def pretrain_reader(
    data_cfg, model_cfg: ModelConfig, seq_len: int, micro_batch_size: int, seed: int, rank: int, world_size: int
):
    """Token-shard windows of ``seq_len`` for this rank, checked against the model's vocab."""
    reader = build_pretrain_reader(
        data_cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size
    )
    check_vocab(reader.vocab_size, model_cfg.vocab_size, data_cfg.path)
    return reader


@hydra.main(config_path=CONF_DIR, config_name="pretrain", version_base=None)
def _main(cfg: DictConfig) -> None:
    run_training(cfg, pretrain_reader)


def main() -> None:
    """Console entry point."""
    _main()


if __name__ == "__main__":
    main()
