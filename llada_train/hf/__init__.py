"""Hugging Face ``transformers`` interop: exports that load with ``trust_remote_code``.

Only the file writer is imported here; ``configuration_llada`` / ``modeling_llada`` need
``transformers`` (the ``hf`` extra) and are imported on demand.
"""

from llada_train.hf.export import AUTO_MAP, HF_FILES, write_hf_files

__all__ = ["AUTO_MAP", "HF_FILES", "write_hf_files"]
