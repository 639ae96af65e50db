"""Make an export folder loadable by ``transformers``: modeling files plus ``auto_map``.

Needs no ``transformers`` (it only writes files), so every export can call it.
"""

from __future__ import annotations

import json
from pathlib import Path

from llada_train.atomic import write_bytes_atomic, write_json_atomic
from llada_train.errors import LladaError

HF_FILES = ("configuration_llada.py", "modeling_llada.py")
# A mask predictor, not a causal LM: AutoModelForCausalLM is left out on purpose so that
# causal-LM tooling (generate(), lm-eval's HFLM) fails loudly instead of scoring wrongly.
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForMaskedLM": "modeling_llada.LLaDAModelLM",
}
SOURCE_DIR = Path(__file__).resolve().parent


def write_hf_files(export_dir: str | Path) -> Path:
    """Copy the modeling files into ``export_dir`` and add ``auto_map`` to its ``config.json``.

    Every other ``config.json`` field is kept. The code files are written first and the
    config last, each atomically, so ``auto_map`` never names a file that is not there yet.
    """
    export_dir = Path(export_dir)
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise LladaError(f"{config_path} not found: write_hf_files needs an export folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise LladaError(f"{config_path}: not valid JSON ({err})") from err
    for name in HF_FILES:
        write_bytes_atomic(export_dir / name, (SOURCE_DIR / name).read_bytes())
    config["auto_map"] = dict(AUTO_MAP)
    write_json_atomic(config_path, config)
    return export_dir
