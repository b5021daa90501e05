"""torch.compile with a safety net: where compilation fails (no compiler, unsupported platform), run eager."""
from __future__ import annotations

import warnings

import torch
from torch import nn


class CompiledOrEager(nn.Module):
    """Calls the compiled module; on the first failure warns once and uses the eager module from then on."""

    def __init__(self, module: nn.Module, **compile_kwargs):
        super().__init__()
        self.module = module
        self.config = getattr(module, "config", None)
        self._compiled = torch.compile(module, **compile_kwargs)
        self._failed = False

    def forward(self, *args, **kwargs):
        if not self._failed:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:  # compilation problems surface at the first call
                self._failed = True
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running the UNet eagerly")
        return self.module(*args, **kwargs)


def compile_or_eager(module: nn.Module, **compile_kwargs) -> nn.Module:
    if not hasattr(torch, "compile"):
        warnings.warn("this torch has no torch.compile; running eagerly")
        return module
    return CompiledOrEager(module, **compile_kwargs)
