"""One way to turn a function of a composed config into a Hydra console entry point."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from llada_train.config import CONF_DIR
from llada_train.schema import not_a_setting, stray_keys

# entry points whose config has a run_dir (Hydra makes it its output folder before our code runs)
RUN_DIR_CONFIGS = ("pretrain", "sft", "dpo", "rl")
# flags that only print: no run starts, so nothing is created
PRINT_ONLY = ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg")


def run_dir_problem(argv: list[str]) -> str | None:
    """Why the ``run_dir=`` given on the command line cannot be used, or None.

    Checked before Hydra, which creates the folder first and dies with a traceback.
    """
    if any(a in PRINT_ONLY or a.startswith("--cfg=") for a in argv):
        return None
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("run_dir=")]
    if not given or not given[-1] or "${" in given[-1]:  # interpolations resolve later
        return None
    run_dir = Path(given[-1])
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        return (
            f"run_dir {run_dir} cannot be created or written ({exc.strerror or exc}): "
            "choose another run_dir or fix its permissions"
        )
    return None


def composition_error(exc: HydraException) -> str:
    """One line for Hydra's multi-line report of an override it cannot apply (an unknown
    key, a group option that does not exist, a value of the wrong type, bad syntax)."""
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        unknown = isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        if unknown and cause.object_type is not None:
            return f"{not_a_setting(cause.full_key, cause.object_type)}: check its spelling"
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    text = str(exc).split("Config search path:")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("See https")]
    if isinstance(exc, MissingConfigException) and len(lines) > 2:  # "Available options in 'g':"
        options = [o for o in lines[2:] if not o.endswith("_schema")]  # typed bases, not choices
        return f"{lines[0]}; {lines[1].rstrip(':').lower()}: {', '.join(options)}"
    return "; ".join(lines)


def hydra_entry(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A zero-argument ``main`` that composes ``conf/<config_name>.yaml`` (plus command-line
    overrides) and calls ``task(cfg)``. The YAML sets ``hydra.job.name``, since Hydra would
    otherwise name the job after this module."""

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _main(cfg: DictConfig) -> None:
        stray = stray_keys(cfg)
        if stray:  # before the task writes anything: a typo or a credential never lands
            print(f"error: {stray[0]}: remove it (check its spelling; '+' appends keys the "
                  "schema does not know)", file=sys.stderr, flush=True)
            sys.exit(2)
        task(cfg)

    def main() -> None:
        problem = run_dir_problem(sys.argv[1:]) if config_name in RUN_DIR_CONFIGS else None
        if problem:
            if os.environ.get("LOCAL_RANK", "0") == "0":  # once per node under torchrun
                print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)
        # Hydra prints a bad override as several lines and exits 1; raised instead, it becomes
        # one line (other exceptions keep their full traceback)
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        try:
            _main()
        except HydraException as exc:
            if os.environ.get("RANK", "0") == "0":  # the same mistake on every rank
                print(f"error: {composition_error(exc)}", file=sys.stderr, flush=True)
            sys.exit(2)

    main.__doc__ = f"Console entry point for conf/{config_name}.yaml."
    return main
