"""The checkpoint layouts `load` reads, and their tensor names mapped to ours.

- transformers / Google (both config dialects), and mlx-lm's text-only conversions of them:
  `model.language_model.*`, `model.vision_tower.*`, `model.embed_audio.*`, ...
- mlx-vlm's conversions (the mlx-community repos): `language_model.model.*` for the decoder,
  the towers and embedders at the top level, convolutions in MLX layout.
- ours (`python -m convert`): `language_model.*`, towers at the top level.

Tower-internal layouts (PyTorch vs MLX convolutions) are told apart by each tower's `sanitize`.
"""

from typing import Callable, Iterable, Optional

# Where the text decoder's tensors are: transformers/Google and mlx-lm, mlx-vlm, ours.
_DECODER = ("model.language_model.", "language_model.model.", "language_model.")
# Tied to embed_tokens in Gemma 3n; some exporters still write it.
_LM_HEAD = ("lm_head.", "language_model.lm_head.")


def checkpoint_key(key: str) -> Optional[str]:
    """A tensor (or module path) name of any supported layout -> ours; None for the tied LM
    head, which is never loaded."""
    if key.startswith("language_model.model."):
        key = "language_model." + key[len("language_model.model.") :]
    key = key.removeprefix("model.")
    return None if key.startswith(_LM_HEAD) else key


def known_layout(keys: Iterable[str]) -> bool:
    """Whether the tensor names follow one of the layouts above (the decoder is found)."""
    return any(k.startswith(_DECODER) for k in keys)


def unsupported_files(names: Iterable[str]) -> Optional[str]:
    """A description of weight files we cannot read (GGUF, PyTorch pickles), if any."""
    for suffix, what in ((".gguf", "GGUF"), (".bin", "PyTorch .bin"), (".pt", "PyTorch .pt"), (".npz", "NumPy .npz")):
        found = sorted(n for n in names if n.endswith(suffix))
        if found:
            return f"{what} weights ({found[0]})"
    return None


QUANT_PARAMS = ("group_size", "bits", "mode")


def quantization_lookup(quantization: Optional[dict]) -> Callable[[str], Optional[dict]]:
    """`lookup(path)` -> the quantization parameters of the module at `path` (our names), or
    None if the config leaves it unquantized.

    A `quantization` block holds the defaults plus entries keyed by module path in the
    checkpoint's own names: mlx-lm and mlx-vlm write one per module when they differ from the
    defaults (a dict, or false), we write one per part ("audio_tower"). The entry for the
    longest of `path` and its dotted prefixes wins."""
    if not quantization:
        return lambda path: None
    defaults = {"mode": "affine", **{k: quantization[k] for k in QUANT_PARAMS if k in quantization}}
    entries = {}
    for key, value in quantization.items():
        if key not in QUANT_PARAMS and isinstance(value, (dict, bool)) and checkpoint_key(key):
            entries[checkpoint_key(key)] = _params(defaults, value) if isinstance(value, dict) else value

    def lookup(path: str) -> Optional[dict]:
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            entry = entries.get(".".join(parts[:n]))
            if entry is not None:
                return (defaults if entry else None) if isinstance(entry, bool) else entry
        return defaults

    return lookup


def _params(defaults: dict, entry: dict) -> dict:
    return {**defaults, **{k: entry[k] for k in QUANT_PARAMS if k in entry}}
