"""Masked diffusion: forward process, training objectives, Monte Carlo likelihood."""

from llada_train.diffusion.ar import ARObjective, ar_targets
from llada_train.diffusion.forward import mask_tokens, maybe_cut_length, sample_mask_prob
from llada_train.diffusion.likelihood import conditional_log_likelihood
from llada_train.diffusion.losses import PretrainObjective, SFTObjective
from llada_train.diffusion.objective_base import LossOutput, ObjectiveConfig
from llada_train.diffusion.registry import OBJECTIVES, build_objective

__all__ = [
    "ARObjective",
    "OBJECTIVES",
    "LossOutput",
    "ObjectiveConfig",
    "PretrainObjective",
    "SFTObjective",
    "ar_targets",
    "build_objective",
    "conditional_log_likelihood",
    "mask_tokens",
    "maybe_cut_length",
    "sample_mask_prob",
]
