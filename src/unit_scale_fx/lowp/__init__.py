"""Low precision: number formats, FP8/FP16 simulation, real FP8 linears, half-precision training.

Import the submodules (:mod:`.formats`, :mod:`.simulate`, :mod:`.fp8_linear`, :mod:`.precision`);
this package module imports nothing, so low layers (config, passes) can use :mod:`.formats`.
"""
