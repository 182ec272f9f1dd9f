"""torch.hub entry points: one per architecture in ``models.ARCHITECTURES``, each taking ``weights=``.

    model = torch.hub.load("path/to/this/repository", "eca_resnet50", source="local",
                           weights="eca_resnet50_k3557.safetensors")

``weights`` is None (random initialisation) or the path of any checkpoint the
project reads: ``.safetensors``, a released or trained ``.pth.tar``, a state_dict.
The entry points are made from ``models.ARCHITECTURES``, so every architecture
added there is offered here too, with its constructor's docstring.
"""
import inspect as _inspect
import os as _os

import engine.checkpoint as _checkpoint
import models as _models

# Names without an underscore are what torch.hub.list offers, so imports above are private.
dependencies = ["torch", "torchvision", "safetensors"]


def _check_own_packages() -> None:
    """torch.hub imports ``models`` and ``engine`` by name: a caller's packages of those names would stand in."""
    here = _os.path.dirname(_os.path.realpath(__file__))
    for module in (_models, _checkpoint):
        found_in = _os.path.dirname(_os.path.dirname(_os.path.realpath(module.__file__)))
        if found_in != here:
            raise ImportError(
                f"hubconf: {module.__name__!r} was imported from {found_in}, not from {here}: load these "
                "models in a process that has not imported another package of that name"
            )


_check_own_packages()

_WEIGHTS_DOC = """

torch.hub entry point. ``weights``: None for random initialisation, or the path of a
checkpoint (``.safetensors``, a released or trained ``.pth.tar``, a state_dict); its
kernel sizes and class count are read from the file, and ``k_size`` or ``num_classes``
given as well must agree with it. Without ``weights``, keyword arguments go to
``models.{name}``.
"""


def _entry_point(name: str):
    constructor = _models.ARCHITECTURES[name]

    def entry_point(weights=None, **kwargs):
        if weights is None:
            return constructor(**kwargs)
        others = sorted(set(kwargs) - {"k_size", "num_classes"})
        if others:
            raise TypeError(f"{name}: with weights, the file decides the model; {', '.join(others)} cannot be given")
        return _checkpoint.model_from_checkpoint(name, _checkpoint.read_checkpoint(_os.fspath(weights)), **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__module__ = __name__
    entry_point.__doc__ = _inspect.cleandoc(constructor.__doc__ or name) + _WEIGHTS_DOC.format(name=name)
    return entry_point


# Made once, at import: new architectures in models.ARCHITECTURES appear here without an edit.
globals().update({name: _entry_point(name) for name in _models.ARCHITECTURES})
