"""Gemma 3n for conditional generation: text decoder, multimodal embedders, tied LM head."""

import functools
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .config import ModelConfig
from .layouts import checkpoint_key
from .mlx_thread import shared_stream
from .multimodal import MultimodalEmbedder
from .text.model import TextModel

TOWERS = ("vision", "audio")


class Gemma3n(nn.Module):
    """The full model. Only the text decoder is built up front; each tower and embedder is a
    *part* built and loaded by `require` when a request first needs it (or never)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text_config)
        self._part_loader: Optional[Callable[[str, nn.Module], None]] = None

    def set_part_loader(self, loader: Optional[Callable[[str, nn.Module], None]]) -> None:
        """`loader(part, module)` loads the weights of a freshly built part into `module`;
        None means the parts that are absent now stay absent."""
        self._part_loader = loader

    def build_part(self, part: str) -> nn.Module:
        """A new, unloaded module for `part`: "embed_<tower>" or "<tower>_tower"."""
        name = tower_of(part)
        if name not in TOWERS or part not in (f"embed_{name}", f"{name}_tower"):
            raise ValueError(f"unknown model part {part!r}")
        block = getattr(self.config, f"{name}_config")
        if block is None:
            raise ValueError(f"this checkpoint has no {name} tower")
        if part.startswith("embed_"):
            return _embedder(block, self.config.text_config.hidden_size)
        return _tower(name, block)

    def require(self, *parts: str) -> None:
        """Make sure the named parts (e.g. "embed_audio", "vision_tower") are loaded."""
        for part in parts:
            if part in self:
                continue
            if self._part_loader is None:
                raise ValueError(f"{part} is not loaded (the model was loaded text-only)")
            # Built on the shared stream, a part's arrays may be evaluated from any thread.
            with mx.stream(shared_stream()):
                module = self.build_part(part)
                self._part_loader(part, module)
            setattr(self, part, module)

    @property
    def parts(self) -> List[str]:
        """Every optional part this checkpoint has, loaded or not."""
        names = [t for t in TOWERS if getattr(self.config, f"{t}_config") is not None]
        return [p for t in names for p in (f"embed_{t}", f"{t}_tower")]

    def unembeddable_ids(self) -> Optional[mx.array]:
        """A [vocab] mask of the ids this model cannot embed (a tower's hard tokens when it was
        loaded text-only), or None. Sampling must never pick them: the next step would fail."""
        vocab = mx.arange(self.config.text_config.vocab_size)
        masks = [
            _owned_ids(vocab, t, self.config)
            for t in TOWERS
            if getattr(self.config, f"{t}_config") is not None
            and f"embed_{t}" not in self
            and self._part_loader is None
        ]
        return functools.reduce(mx.logical_or, masks) if masks else None

    def make_cache(self) -> List[Any]:
        return self.language_model.make_cache()

    # -- embedding --------------------------------------------------------------------------

    def embed_inputs(
        self,
        input_ids: mx.array,
        image_features: Optional[mx.array] = None,
        audio_features: Optional[mx.array] = None,
    ):
        """Token ids -> inputs_embeds. Multimodal hard tokens go through their embedder;
        soft-token placeholders are replaced by the (already embedded) `image_features` /
        `audio_features`, each [N, D] in placeholder order. The per-layer embeddings are
        read separately (`language_model.per_layer_embeddings`), a prefill chunk at a time."""
        lm = self.language_model
        h = lm.embed(input_ids)
        for name in TOWERS:
            owned = _owned_ids(input_ids, name, self.config)
            if owned is None or not mx.any(owned).item():
                continue
            self.require(f"embed_{name}")
            embedder = self[f"embed_{name}"]
            safe = mx.where(owned, input_ids, embedder.vocab_offset)
            h = mx.where(owned[..., None], embedder.embed_ids(safe).astype(h.dtype), h)
        for token_id, feats in (
            (self.config.image_token_id, image_features),
            (self.config.audio_token_id, audio_features),
        ):
            if feats is not None:
                h = scatter_placeholders(h, input_ids == token_id, feats)
        return h

    # -- multimodal encoders ----------------------------------------------------------------

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """[N, 3, H, W] pixels -> [N * 256, D] soft-token embeddings in text space."""
        self.require("embed_vision", "vision_tower")
        features = self.vision_tower(pixel_values.astype(_float_dtype(self.vision_tower)))
        features = features * self.config.vision_config["hidden_size"] ** 0.5
        return self.embed_vision.embed_soft(features).reshape(-1, self.config.text_config.hidden_size)

    def encode_audio(self, features: mx.array, valid: mx.array) -> mx.array:
        """Log-mel [N, T, 128] with its valid-frame mask [N, T] -> [N * 188, D] soft tokens,
        padded with the last audio-vocabulary embedding as the reference model does."""
        from .audio.prompt import pad_audio_features

        self.require("embed_audio", "audio_tower")
        encoded, padding = self.audio_tower(features.astype(_float_dtype(self.audio_tower)), ~valid)
        embedder = self.embed_audio
        embedded = embedder.embed_soft(encoded)
        last_id = mx.array([embedder.vocab_offset + embedder.vocab_size - 1])
        padded = pad_audio_features(
            embedded, padding, embedder.embed_ids(last_id)[0], self.config.audio_soft_tokens_per_image
        )
        return padded.reshape(-1, self.config.text_config.hidden_size)

    # -- forward ----------------------------------------------------------------------------

    def logits(self, hidden: mx.array) -> mx.array:
        out = self.language_model.embed_tokens.as_linear(hidden)
        cap = self.config.text_config.final_logit_softcapping
        if cap is not None:
            out = mx.tanh(out / cap) * cap
        return out

    def __call__(
        self,
        input_ids: mx.array,
        cache: Optional[List[Any]] = None,
        inputs_embeds: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits for `input_ids` [B, L]; `inputs_embeds` from `embed_inputs` when the ids
        hold image/audio placeholders."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids)
        per_layer_embeds = self.language_model.per_layer_embeddings(input_ids)
        return self.logits(self.language_model(inputs_embeds, per_layer_embeds, cache))

    # -- weights ----------------------------------------------------------------------------

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Checkpoint names of any supported layout (see `layouts`) -> this model's
        (`language_model.*`, `embed_audio.*`, `vision_tower.*`, ...). Tower-internal layouts
        are fixed by each tower's `sanitize` when the part is loaded."""
        text = self.config.text_config
        # 2025 checkpoints still carry K/V weights for the KV-shared layers, which compute none.
        shared = tuple(
            f"language_model.layers.{i}.self_attn.{p}."
            for i in range(text.first_kv_shared_layer, text.num_hidden_layers)
            for p in ("k_proj", "v_proj", "k_norm", "v_norm")
        )
        out = {}
        for key, value in weights.items():
            key = checkpoint_key(key)
            if key is not None and not key.startswith(shared):
                out[key] = value
        return out


def tower_of(part: str) -> str:
    """"vision" for "embed_vision" and "vision_tower"."""
    return part.removeprefix("embed_").removesuffix("_tower")


def scatter_placeholders(h: mx.array, mask: mx.array, features: mx.array) -> mx.array:
    """Put the rows of `features` ([N, D]) at the N True positions of `mask` ([B, L]), in order."""
    idx = np.flatnonzero(np.array(mask))
    if idx.size != features.shape[0]:
        raise ValueError(f"{features.shape[0]} soft tokens for {idx.size} placeholder positions")
    flat = h.reshape(-1, h.shape[-1])
    flat[mx.array(idx)] = features.astype(h.dtype)
    return flat.reshape(h.shape)


def _float_dtype(module: nn.Module) -> mx.Dtype:
    return next(v.dtype for _, v in tree_flatten(module.parameters()) if mx.issubdtype(v.dtype, mx.floating))


def _owned_ids(input_ids: mx.array, name: str, config: ModelConfig) -> Optional[mx.array]:
    block = getattr(config, f"{name}_config")
    if block is None:
        return None
    offset = block["vocab_offset"]
    return (input_ids >= offset) & (input_ids < offset + block["vocab_size"])


def _embedder(block: dict, text_dims: int) -> MultimodalEmbedder:
    return MultimodalEmbedder(
        dims=block["hidden_size"],
        text_dims=text_dims,
        vocab_size=block["vocab_size"],
        vocab_offset=block["vocab_offset"],
        eps=block["rms_norm_eps"],
    )


def _tower(name: str, block: dict) -> nn.Module:
    if name == "vision":
        from .vision.config import VisionConfig
        from .vision.encoder import VisionTower

        return VisionTower(VisionConfig.from_dict(block))
    from .audio.config import AudioConfig
    from .audio.encoder import AudioEncoder

    return AudioEncoder(AudioConfig.from_dict(block))
