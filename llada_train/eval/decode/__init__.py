"""Decoding by configuration: one dataclass and one function per sampler, in one registry.

``DECODERS`` maps a method name to ``(config class, function)``; ``decode_batch`` runs the
method a config names. Importing this package registers the built-in samplers.
"""

from llada_train.eval.decode import methods as _methods  # noqa: F401  (registers built-ins)
from llada_train.eval.decode.base import (
    DECODERS,
    DecodeConfig,
    DecodeMethod,
    DecodeRequest,
    DecodeResult,
    GuidedDecodeConfig,
    decode_batch,
    decode_config,
    method_of,
    register,
    register_decode_schemas,
)
from llada_train.eval.decode.methods import (
    BlockConfig,
    HexConfig,
    InfillConfig,
    LowConfidenceConfig,
    MedConfig,
    RandomConfig,
    ThresholdConfig,
    ToleratorConfig,
)

__all__ = [
    "DECODERS",
    "BlockConfig",
    "DecodeConfig",
    "DecodeMethod",
    "DecodeRequest",
    "DecodeResult",
    "GuidedDecodeConfig",
    "HexConfig",
    "InfillConfig",
    "LowConfidenceConfig",
    "MedConfig",
    "RandomConfig",
    "ThresholdConfig",
    "ToleratorConfig",
    "decode_batch",
    "decode_config",
    "method_of",
    "register",
    "register_decode_schemas",
]
