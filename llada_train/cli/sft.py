"""``llada-sft``: supervised fine-tuning (SPEC §3) from Hydra config ``conf/sft.yaml``.

Same loop, checkpointing, resume and metrics as pre-training; only the data and the
objective differ. ``init_from`` names a released-layout folder (our export or LLaDA-8B-Base);
``init_from=none`` fine-tunes random weights, which must be asked for explicitly.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llada_train.cli.common import ReaderRequest, StartCheck, run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
from llada_train.data import SFTDataConfig, build_sft_reader
from llada_train.data.sft import check_sft_data
from llada_train.data.stream import Reader, ReaderInfo
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.train.loop import TrainResult

register_configs()

RANDOM_INIT = "none"  # init_from=none: random weights, on purpose


def sft_reader(
    data_cfg: SFTDataConfig, model_cfg: ModelConfig, req: ReaderRequest
) -> tuple[Reader, ReaderInfo]:
    """EOS-padded (prompt, response) batches for this rank (records keep their own length)."""
    return build_sft_reader(
        data_cfg, req.micro_batch_size, req.seed, req.rank, req.world_size, model_cfg.eos_token_id
    )


def sft_checks(random_init: bool) -> StartCheck:
    """The SFT start checks run by ``preflight`` (before any process group)."""

    def check(cfg: DictConfig, model_cfg: ModelConfig) -> None:
        # a forgotten init_from would fine-tune random weights for hours without a word
        if not cfg.init_from and not random_init:
            raise LladaError(
                "llada-sft needs init_from=<model folder> (our pretraining export or a local "
                "LLaDA-8B-Base): set it, or init_from=none to fine-tune random weights on purpose"
            )
        check_sft_data(cfg.data, model_cfg.vocab_size, model_cfg.max_sequence_length)

    return check


def run_sft(cfg: DictConfig) -> TrainResult:
    """Train from ``cfg`` after the SFT checks; ``init_from=none`` becomes no weights to load."""
    random_init = isinstance(cfg.init_from, str) and cfg.init_from.lower() == RANDOM_INIT
    if random_init:
        cfg.init_from = None  # what the model builder reads as "random initialisation"
    return run_training(cfg, sft_reader, check=sft_checks(random_init))


main = hydra_entry("sft", run_sft)


if __name__ == "__main__":
    main()
