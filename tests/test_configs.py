"""Every shipped config composes through its schema; unknown keys fail (litgpt's rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from llada_train.config import register_configs
from tests.conftest import REPO

CONF = REPO / "conf"
ROOTS = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# groups whose options belong to one root only
ROOT_OF_GROUP = {"data": ("pretrain", "sft")}

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
    errors = []
    for root in roots:
        try:
            _compose(root, [f"{group}={option}"])
            return
        except Exception as exc:  # a data option fits exactly one of the roots
            errors.append(f"{root}: {exc}")
    pytest.fail(f"{group}/{option}.yaml composes with no root: {errors}")


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
