"""The ``unit-scale-fx`` command (:mod:`.main`) and its target loading (:mod:`.targets`)."""

from .main import main

__all__ = ["main"]
