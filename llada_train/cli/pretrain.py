"""``llada-pretrain``: masked-diffusion pre-training from Hydra config ``conf/pretrain.yaml``."""

from __future__ import annotations

from omegaconf import DictConfig

from llada_train.cli.common import ReaderRequest, run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
from llada_train.data import PretrainDataConfig, build_pretrain_reader
from llada_train.data.pretrain import check_pretrain_data
from llada_train.data.stream import Reader, ReaderInfo
from llada_train.model.config import ModelConfig

register_configs()


def pretrain_reader(
    data_cfg: PretrainDataConfig, model_cfg: ModelConfig, req: ReaderRequest
) -> tuple[Reader, ReaderInfo]:
    """Token-shard windows of ``seq_len`` for this rank, ids checked against the model's vocabulary."""
    return build_pretrain_reader(
        data_cfg, req.seq_len, req.micro_batch_size, req.seed, req.rank, req.world_size,
        eos_token_id=model_cfg.eos_token_id, vocab_size=model_cfg.vocab_size,
    )


def pretrain_checks(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """The data's manifests against the model, run by ``preflight`` (before any process group)."""
    check_pretrain_data(cfg.data, model_cfg.vocab_size)


main = hydra_entry("pretrain", lambda cfg: run_training(cfg, pretrain_reader, check=pretrain_checks))


if __name__ == "__main__":
    main()
