"""Prompts for Gemma 3n: the chat template, multimodal placeholders and their inputs.

A request is a list of chat messages in the transformers format::

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                  {"type": "audio", "audio": "q.wav"},
                                  {"type": "text", "text": "Answer the question."}]}]

Images may be paths, PIL images or arrays; audio a path, or an `(array, sampling_rate)` pair.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

from .config import ModelConfig
from .tokenizer import Tokenizer

Message = dict
Prompt = Union[str, List[Message]]

IMAGE_PLACEHOLDER = "<image_soft_token>"
AUDIO_PLACEHOLDER = "<audio_soft_token>"
PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "audio": AUDIO_PLACEHOLDER}


@dataclass
class PromptInputs:
    """Token ids and the multimodal inputs for their placeholders, in placeholder order."""

    token_ids: List[int]
    images: List[np.ndarray] = field(default_factory=list)  # each [3, H, W]
    audio: List[np.ndarray] = field(default_factory=list)  # 16 kHz mono clips, <= 30 s each

    def pixel_values(self) -> Optional[np.ndarray]:
        return np.stack(self.images) if self.images else None


def user_message(text: str, images: Sequence[Any] = (), audio: Sequence[Any] = ()) -> Message:
    """A user turn with images, then audio, then the text (the order Gemma 3n was tuned on)."""
    content = [{"type": "image", "image": i} for i in images]
    content += [{"type": "audio", "audio": a} for a in audio]
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


class Processor:
    """Turns chat messages into `PromptInputs` with Gemma 3n's chat template. The image
    processor and audio feature extractor are created on first use."""

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, preprocessor: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.config = config
        self.preprocessor = preprocessor or {}
        self._image_processor = None
        self._feature_extractor = None

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> "Processor":
        pre = path / "preprocessor_config.json"
        return cls(
            Tokenizer(path / "tokenizer.model"),
            config,
            json.loads(pre.read_text()) if pre.is_file() else None,
        )

    # -- template ---------------------------------------------------------------------------

    def render(
        self,
        messages: List[Message],
        add_generation_prompt: bool = True,
        media: Optional[Callable[[dict], str]] = None,
    ) -> str:
        """Gemma 3n's chat template, without the leading <bos> (added as an id). Each image or
        audio item becomes what `media(item)` returns (by default one placeholder)."""
        media = media or (lambda item: PLACEHOLDERS[item["type"]])
        messages = list(messages)
        prefix = ""
        if messages and messages[0]["role"] == "system":
            prefix = _text_of(messages.pop(0)["content"]).strip() + "\n\n"
        out = []
        for i, message in enumerate(messages):
            role = {"assistant": "model"}.get(message["role"], message["role"])
            if role not in ("user", "model"):
                raise ValueError(f"unsupported message role {message['role']!r}")
            if (role == "user") != (i % 2 == 0):
                raise ValueError("conversation roles must alternate user/assistant/user/...")
            body = _content(message["content"], media)
            out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{body}<end_of_turn>\n")
        if add_generation_prompt:
            out.append("<start_of_turn>model\n")
        return "".join(out)

    # -- inputs -----------------------------------------------------------------------------

    def __call__(
        self, prompt: Prompt, add_bos: bool = True, add_generation_prompt: bool = True
    ) -> PromptInputs:
        """Messages (or a plain user prompt) -> token ids plus preprocessed images/audio."""
        messages = [user_message(prompt)] if isinstance(prompt, str) else prompt
        images, clips = [], []

        def load_media(item: dict) -> str:
            if item["type"] == "image":
                images.append(self.image_processor.preprocess_one(item["image"]))
                return IMAGE_PLACEHOLDER
            segments = self.audio_segments(item["audio"])
            clips.extend(segments)
            return AUDIO_PLACEHOLDER * len(segments)

        text = self.render(messages, add_generation_prompt, load_media)
        return self.encode(text, images, clips, add_bos)

    def encode(self, text: str, images: Sequence[np.ndarray], clips: Sequence[np.ndarray], add_bos: bool = False) -> PromptInputs:
        """Rendered text with one placeholder per (preprocessed) image and per audio clip of
        at most 30 s -> `PromptInputs`."""
        from .audio.prompt import expand_audio_placeholders
        from .vision.prompt import expand_image_placeholders

        if text.count(AUDIO_PLACEHOLDER) != len(clips):
            raise ValueError(
                f"prompt has {text.count(AUDIO_PLACEHOLDER)} audio placeholders for {len(clips)} clips"
            )
        text = expand_image_placeholders(
            text, num_images=len(images), num_tokens=self.config.vision_soft_tokens_per_image
        )
        text = expand_audio_placeholders(text, num_tokens=self.config.audio_soft_tokens_per_image)
        return PromptInputs(self.tokenizer.encode(text, add_bos=add_bos), list(images), list(clips))

    def audio_segments(self, source) -> List[np.ndarray]:
        """Load audio (a path, or an `(array, sampling_rate)` pair) as 16 kHz clips of at most
        30 s: longer audio is split at quiet points (see `split_audio`), one placeholder each."""
        from .audio.io import load_audio
        from .audio.prompt import split_audio

        samples = load_audio(*source) if isinstance(source, tuple) else load_audio(source)
        return split_audio(samples)

    def audio_features(self, clips: Sequence[np.ndarray]):
        """Clips -> (log-mel [N, T, 128], valid-frame mask [N, T]), padded to the longest."""
        return self.feature_extractor(list(clips))

    @property
    def image_processor(self):
        if self._image_processor is None:
            from .vision.processor import ImageProcessor

            self._image_processor = ImageProcessor.from_dict(self.preprocessor)
        return self._image_processor

    @property
    def feature_extractor(self):
        if self._feature_extractor is None:
            from .audio.features import AudioFeatureExtractor

            self._feature_extractor = AudioFeatureExtractor.from_dict(self.preprocessor)
        return self._feature_extractor


def _content(content, media: Callable[[dict], str]) -> str:
    if isinstance(content, str):
        return content.strip()
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "text":
            parts.append(item["text"].strip())
        elif kind in PLACEHOLDERS:
            parts.append(media(item))
        else:
            raise ValueError(f"unsupported content type {kind!r}")
    return "".join(parts)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(c["text"] for c in content if c.get("type") == "text")
