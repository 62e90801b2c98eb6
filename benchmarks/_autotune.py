"""What a Triton autotuner would try for one call, without timing anything: shared by the
tools that replace ``Autotuner.run`` (``launch_check`` compiles every candidate,
``step_cost`` counts the first)."""

from __future__ import annotations

from typing import Any, List


def pruned_configs(tuner: Any, args: tuple, kwargs: dict) -> List[Any]:
    """``tuner``'s configs left after its ``prune_configs_by``/``early_config_prune`` for a
    call with ``args``/``kwargs`` (pruning reads the bound arguments from ``tuner.nargs``,
    set here for the duration as ``Autotuner.run`` does)."""
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        return tuner.prune_configs(kwargs)
    finally:
        tuner.nargs = None
