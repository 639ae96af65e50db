"""One way to turn a function of a composed config into a Hydra console entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from llada_train.config import CONF_DIR
from llada_train.schema import stray_keys


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
        _main()

    main.__doc__ = f"Console entry point for conf/{config_name}.yaml."
    return main
