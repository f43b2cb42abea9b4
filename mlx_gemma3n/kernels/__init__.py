"""Fused decode kernels (Metal bodies with CUDA twins) and their pure-MLX references.

One module per kernel; `base` holds the dispatch, the self-check and the reference switch
(`MLX_GEMMA3N_KERNELS=0`), `prelude` the header that maps the Metal body dialect to CUDA."""

from .base import ENV_SWITCH, FusedOp, kernel_setting, kernels_enabled, set_kernels, use_factory

__all__ = ["ENV_SWITCH", "FusedOp", "kernel_setting", "kernels_enabled", "set_kernels", "use_factory"]
