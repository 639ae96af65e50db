"""``llada-sft``: supervised fine-tuning (SPEC §3) from Hydra config ``conf/sft.yaml``.

Same loop, checkpointing, resume and metrics as pre-training; only the data and the
objective differ. ``init_from`` names a released-layout folder (our export or LLaDA-8B-Base).
"""

from __future__ import annotations

from llada_train.cli.common import ReaderRequest, run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
from llada_train.data import SFTDataConfig, build_sft_reader
from llada_train.data.stream import Reader, ReaderInfo
from llada_train.model.config import ModelConfig

register_configs()


def sft_reader(
    data_cfg: SFTDataConfig, model_cfg: ModelConfig, req: ReaderRequest
) -> tuple[Reader, ReaderInfo]:
    """EOS-padded (prompt, response) batches for this rank (records keep their own length)."""
    return build_sft_reader(
        data_cfg, req.micro_batch_size, req.seed, req.rank, req.world_size, model_cfg.eos_token_id
    )


main = hydra_entry("sft", lambda cfg: run_training(cfg, sft_reader))


if __name__ == "__main__":
    main()
