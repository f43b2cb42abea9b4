"""mlx-lm's KV caches, masks and samplers, without mlx-lm's package import.

Any `import mlx_lm.<module>` first runs `mlx_lm/__init__.py`, which imports transformers (and
torch, where installed): ~700 MB of resident memory and seconds of start-up, for code we never
call. The modules we reuse need only mlx, so they are loaded from mlx-lm's own files under a
private package name; a user's `import mlx_lm` is unaffected.
"""

import importlib
import importlib.util
import sys
import types

_ALIAS = f"{__name__}._pkg"


def _import(module: str) -> types.ModuleType:
    if _ALIAS not in sys.modules:
        spec = importlib.util.find_spec("mlx_lm")  # locates the package without running it
        if spec is None:
            raise ImportError("mlx-lm is not installed (pip install mlx-lm)")
        package = types.ModuleType(_ALIAS)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[_ALIAS] = package
    return importlib.import_module(f"{_ALIAS}.{module}")


base = _import("models.base")
cache = _import("models.cache")
sample_utils = _import("sample_utils")
