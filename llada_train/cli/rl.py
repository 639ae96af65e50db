"""``llada-rl``: ESPO reinforcement learning with verifiable rewards, from ``conf/rl.yaml``.

The SFT run's loop, checkpoints, resume, DeepSpeed and LoRA; the data are prompts with gold
answers (``data/prompts.py``), and the objective (``objective=espo``, ``rl/objective.py``)
samples its own completions with the ``decode`` config and scores them with ``data.rewards``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from llada_train.cli.common import ReaderRequest, check_post_training, run_training
from llada_train.cli.entry import hydra_entry
from llada_train.config import register_configs
from llada_train.data.prompts import PromptDataConfig, PromptReader, PromptSet, load_prompt_set
from llada_train.data.stream import ReaderInfo
from llada_train.diffusion.objective_base import ObjectiveConfig
from llada_train.errors import LladaError
from llada_train.eval.decode import DecodeConfig, method_of
from llada_train.eval.text import TextCodec
from llada_train.model.config import ModelConfig
from llada_train.rl.objective import ESPOObjective
from llada_train.rl.rewards import load_reward
from llada_train.rl.rollout import RolloutTask
from llada_train.train.loop import TrainResult

register_configs()
TEXT_ONLY_DECODERS = ("hex", "infill")  # no single token canvas per row to score


def rl_checks(cfg: DictConfig, model_cfg: ModelConfig) -> None:
    """Start checks run by ``preflight``: weights, objective, reference mode, sampler, rewards."""
    check_post_training(cfg, "llada-rl", "espo", "train")
    if cfg.trainer.epochs > 0:
        raise LladaError("llada-rl counts optimizer steps: set trainer.epochs=0 and trainer.max_steps")
    decode: DecodeConfig = OmegaConf.to_object(cfg.decode)
    method_of(decode)
    if decode.method in TEXT_ONLY_DECODERS:
        raise LladaError(
            f"decode={decode.method} gives texts, not one token canvas per row: rollouts need "
            "the ids; use low_confidence, random, med, threshold, block or tolerator"
        )
    if decode.gen_length >= cfg.trainer.seq_len:
        raise LladaError(
            f"decode.gen_length={decode.gen_length} leaves no room for prompts in "
            f"trainer.seq_len={cfg.trainer.seq_len}: raise trainer.seq_len"
        )
    if not cfg.data.rewards:
        raise LladaError("data.rewards is empty: name at least one reward function")
    for path in [r.path for r in cfg.data.rewards] + [cfg.data.accuracy]:
        load_reward(path)


def run_rl(cfg: DictConfig) -> TrainResult:
    """Train ESPO from ``cfg`` after the RL checks."""
    loaded: dict[str, PromptSet] = {}
    decode: DecodeConfig = OmegaConf.to_object(cfg.decode)
    obj: ObjectiveConfig = OmegaConf.to_object(cfg.objective)

    def prompt_reader(
        data_cfg: PromptDataConfig, model_cfg: ModelConfig, req: ReaderRequest
    ) -> tuple[PromptReader, ReaderInfo]:
        prompts = loaded["prompts"]  # read by the start-up check
        accum = cfg.trainer.global_batch_size // (req.micro_batch_size * req.world_size)
        reader = PromptReader(prompts, req.micro_batch_size, accum, obj.inner_iterations,
                              req.seed, req.rank, req.world_size, model_cfg.eos_token_id)  # fmt: skip
        return reader, ReaderInfo(vocab_size=model_cfg.vocab_size, num_records=len(prompts))

    def espo(obj_cfg: ObjectiveConfig, model_cfg: ModelConfig) -> ESPOObjective:
        data_cfg: PromptDataConfig = OmegaConf.to_object(cfg.data)
        eot = data_cfg.chat_template.eot
        codec = TextCodec(data_cfg.tokenizer, stop_ids=[model_cfg.eos_token_id])
        eot_id = codec.token_id(eot)
        codec.stop_ids.add(eot_id)
        task = RolloutTask(decode, data_cfg, loaded["prompts"], cfg.seed, model_cfg.mask_token_id,
                           model_cfg.eos_token_id, eot_id, codec.decode)  # fmt: skip
        return ESPOObjective(obj_cfg, model_cfg.mask_token_id, model_cfg.eos_token_id, task)

    def check(cfg: DictConfig, model_cfg: ModelConfig) -> None:
        rl_checks(cfg, model_cfg)  # then every record, before any process group starts
        loaded["prompts"] = load_prompt_set(
            OmegaConf.to_object(cfg.data), cfg.trainer.seq_len - decode.gen_length
        )

    return run_training(cfg, prompt_reader, make_objective=espo, check=check)


main = hydra_entry("rl", run_rl)


if __name__ == "__main__":
    main()
