"""A ``run_dir`` that cannot be created or written is one line and exit code 2, found before
Hydra (which creates the folder first and dies with a traceback)."""

from __future__ import annotations

import os

import pytest

from llada_train.cli import entry
from tests.launch_utils import cli


def line(path, reason: str) -> str:
    return (
        f"run_dir {path} cannot be created or written ({reason}): "
        "choose another run_dir or fix its permissions"
    )


def test_usable_and_unset_run_dirs_pass(tmp_path):
    assert entry.run_dir_problem([f"run_dir={tmp_path / 'a' / 'b'}"]) is None
    assert (tmp_path / "a" / "b").is_dir()
    assert entry.run_dir_problem(["trainer.max_steps=3"]) is None
    assert entry.run_dir_problem(["run_dir=/proc/nope", "--help"]) is None  # prints only


def test_problems_name_the_path_and_the_reason(tmp_path, monkeypatch):
    a_file = tmp_path / "f"
    a_file.write_text("")
    # tests run as root, where chmod stops nothing: a file as parent, /proc, a denied access
    assert entry.run_dir_problem([f"run_dir={a_file}/sub"]) == line(f"{a_file}/sub", "Not a directory")
    assert entry.run_dir_problem([f"++run_dir={a_file}"]) == line(a_file, "File exists")
    assert entry.run_dir_problem(["run_dir=/proc/nope"]) == line(
        "/proc/nope", "No such file or directory"
    )
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert entry.run_dir_problem([f"run_dir={tmp_path}"]) == line(tmp_path, "Permission denied")


@pytest.mark.parametrize("script", ["llada-pretrain", "llada-sft"])
def test_entry_points_stop_with_the_line(tmp_path, script):
    a_file = tmp_path / "f"
    a_file.write_text("")
    proc = cli(script, [f"run_dir={a_file}/run"], check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: " + line(f"{a_file}/run", "Not a directory") + "\n"
