"""``llada-sft``: supervised fine-tuning (SPEC §3) from Hydra config ``conf/sft.yaml``.

Same loop, checkpointing, resume and metrics as pre-training; only the data and the
objective differ. ``init_from`` names a released-layout folder (our export or LLaDA-8B-Base).
"""

from __future__ import annotations

from llada_train.cli.common import run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
from llada_train.data import build_sft_reader, check_vocab
from llada_train.model.config import ModelConfig

register_configs()


def sft_reader(
    data_cfg, model_cfg: ModelConfig, seq_len: int, micro_batch_size: int, seed: int, rank: int, world_size: int
):
    """EOS-padded (prompt, response) batches for this rank, checked against the model's vocab."""
    reader = build_sft_reader(
        data_cfg, micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size,
        eos_token_id=model_cfg.eos_token_id,
    )
    check_vocab(reader.vocab_size, model_cfg.vocab_size, data_cfg.path)
    return reader


main = hydra_entry("sft", lambda cfg: run_training(cfg, sft_reader))


if __name__ == "__main__":
    main()
