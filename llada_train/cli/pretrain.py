"""``llada-pretrain``: masked-diffusion pre-training from Hydra config ``conf/pretrain.yaml``."""

from __future__ import annotations

from llada_train.cli.common import run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
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


main = hydra_entry("pretrain", lambda cfg: run_training(cfg, pretrain_reader))


if __name__ == "__main__":
    main()
