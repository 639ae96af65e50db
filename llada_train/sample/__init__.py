"""Reverse-process samplers (SPEC §5, §7) as plain functions over a model.

Every sampler takes token ids as parameters and returns the forward passes it spent.
"""

from llada_train.sample.ar import ar_generate, ar_log_likelihood
from llada_train.sample.block import block_generate
from llada_train.sample.common import SampleOutput, left_pad, num_transfer_schedule
from llada_train.sample.fast import fast_generate
from llada_train.sample.generate import generate
from llada_train.sample.hex import HexOutput, hex_generate, majority_vote
from llada_train.sample.med import InfillOutput, infill_generate, med_generate
from llada_train.sample.tolerator import refinement_fractions, tolerator_generate

__all__ = [
    "HexOutput",
    "InfillOutput",
    "SampleOutput",
    "ar_generate",
    "ar_log_likelihood",
    "block_generate",
    "fast_generate",
    "generate",
    "hex_generate",
    "infill_generate",
    "left_pad",
    "majority_vote",
    "med_generate",
    "num_transfer_schedule",
    "refinement_fractions",
    "tolerator_generate",
]
