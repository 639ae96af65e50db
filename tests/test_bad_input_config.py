"""A command-line override Hydra cannot apply (an unknown key, a group option that does not
exist, a value of the wrong type, bad syntax) is one line and exit code 2, not Hydra's
multi-line report and exit code 1. Run in-process through the console entry points."""

from __future__ import annotations

import sys

import pytest

from llada_train.cli import generate, pretrain
from tests.conftest import REPO


def run_main(main, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["llada", *argv])
    # unset, as for a user; the entry point sets it for itself, and teardown unsets it again
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    return capsys.readouterr().err


def options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))


@pytest.mark.parametrize("override,line", [
    ("trainer.max_stepz=3", "trainer.max_stepz is not a setting of TrainerConfig (did you mean "
                            "trainer.max_steps?): check its spelling"),
    ("optim.peak_lr=1", "optim.peak_lr is not a setting of OptimConfig: check its spelling"),
    ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be "
                              "converted to Integer"),
    ("trainer.max_steps", "Error parsing override 'trainer.max_steps'; missing EQUAL at '<EOF>'"),
    ("model=llada_9b", "In 'pretrain': Could not find 'model/llada_9b'; available options in "
                       f"'model': {options('model')}"),
])
def test_bad_override_is_one_line(override, line, tmp_path, monkeypatch, capsys):
    err = run_main(pretrain.main, [f"run_dir={tmp_path / 'r'}", override], monkeypatch, capsys)
    assert err == f"error: {line}\n"
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_group_options_list_choices_not_schemas(monkeypatch, capsys):
    err = run_main(generate.main, ["decode=nope"], monkeypatch, capsys)
    assert err == ("error: In 'generate': Could not find 'decode/nope'; available options in "
                   f"'decode': {options('decode')}\n")
    assert "_schema" not in err
