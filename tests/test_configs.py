"""Every shipped config composes through its schema; unknown keys fail (litgpt's rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from llada_train.config import register_configs
from llada_train.errors import LladaError
from tests.conftest import REPO

CONF = REPO / "conf"
ROOTS = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# the roots a group's options compose with: any one of them (a data option fits one kind of
# run), or every one of them (a decode option serves both inference entry points)
ROOT_OF_GROUP = {"data": ("pretrain", "sft", "rl"), "decode": ("generate", "eval", "rl")}
EVERY_ROOT = {"decode"}

register_configs()
for module in ("llada_train.cli.generate", "llada_train.cli.eval"):
    __import__(module)  # registers their schemas


def _compose(root: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=root, overrides=overrides)
    # required paths (``???``) get a placeholder; then resolve and convert through the schema
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, "placeholder/path")
    OmegaConf.to_object(cfg)
    return cfg


@pytest.mark.parametrize("root", ROOTS)
def test_root_config_composes(root):
    _compose(root, [])


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _options())
def test_every_group_option_composes(group, option):
    roots = ROOT_OF_GROUP.get(group, ("pretrain", "sft"))
    if group in EVERY_ROOT:
        for root in roots:
            _compose(root, [f"{group}={option}"])
        return
    errors = []
    for root in roots:
        try:
            _compose(root, [f"{group}={option}"])
            return
        except Exception as exc:  # a data option fits exactly one of the roots
            errors.append(f"{root}: {exc}")
    pytest.fail(f"{group}/{option}.yaml composes with no root: {errors}")


@pytest.mark.parametrize("root", ["generate", "eval"])
def test_decode_group_is_typed_and_strict(root):
    from llada_train.eval.config import to_schema
    from llada_train.eval.decode import DECODERS, LowConfidenceConfig, MedConfig

    default = to_schema(_compose(root, []))
    assert type(default.decode) is LowConfidenceConfig and default.decode.block_length == 32
    assert default.decode.steps is None  # one token per step: steps = gen_length
    assert default.decode.gen_length == {"generate": 128, "eval": 256}[root]
    for name, entry in DECODERS.items():
        cfg = to_schema(_compose(root, [f"decode={name}"]))
        assert type(cfg.decode) is entry.config and cfg.decode.method == name
    overrides = ["decode=med", "decode.entropy_threshold=0.3", "decode.gen_length=64"]
    med = to_schema(_compose(root, overrides))
    assert type(med.decode) is MedConfig
    assert (med.decode.entropy_threshold, med.decode.gen_length) == (0.3, 64)
    # a knob of another method: refused whether overridden or added
    with pytest.raises(ConfigCompositionException, match="decode.steps"):
        _compose(root, ["decode=med", "decode.steps=3"])
    with pytest.raises(LladaError, match="decode.steps is not a setting of MedConfig"):
        to_schema(_compose(root, ["decode=med", "+decode.steps=3"]))  # Hydra's + skips the schema
    with pytest.raises(LladaError, match="foo is not a setting of"):
        to_schema(_compose(root, ["+foo=1"]))
    with pytest.raises(ConfigCompositionException, match="entropy_threshold"):
        _compose(root, ["decode=med", "decode.entropy_threshold=low"])


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        _compose("pretrain", ["trainer.max_stepz=5"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        _compose("pretrain", ["trainer.max_steps=many"])


def test_group_files_have_no_stray_keys(tmp_path: Path):
    # the schema rejects a key the dataclass lacks, even from a YAML file
    bad = tmp_path / "conf"
    (bad / "trainer").mkdir(parents=True)
    (bad / "trainer" / "oops.yaml").write_text("max_steps: 3\nlearning_rate: 1\n")
    with initialize_config_dir(config_dir=str(CONF), version_base=None), pytest.raises(ConfigCompositionException):
        compose(config_name="pretrain", overrides=[f"hydra.searchpath=[file://{bad}]", "trainer=oops"])
