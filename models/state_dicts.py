"""Parameter names as wrappers save them: what a state_dict from DDP or torch.compile looks like."""
from typing import Dict, Mapping, TypeVar

__all__ = ["WRAPPER_PREFIXES", "strip_wrapper_prefixes"]

# DataParallel / DistributedDataParallel save "module.<name>", torch.compile "_orig_mod.<name>",
# and wrappers nest in any order ("module._orig_mod.<name>").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Value = TypeVar("Value")


def strip_wrapper_prefixes(state_dict: Mapping[str, Value]) -> Dict[str, Value]:
    """The state_dict with every leading ``module.`` and ``_orig_mod.`` dropped from its keys."""
    return {_unwrapped(key): value for key, value in state_dict.items()}


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]  # each prefix is one dotted component
    return key
