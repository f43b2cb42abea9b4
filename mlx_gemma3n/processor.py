"""Prompts for Gemma 3n: the chat template, multimodal placeholders and their inputs.

A request is a list of chat messages in the transformers format::

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                  {"type": "audio", "audio": "q.wav"},
                                  {"type": "text", "text": "Answer the question."}]}]

Images may be paths, PIL images or arrays; audio a path, or an `(array, sampling_rate)` pair.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

from .config import ModelConfig
from .chat_template import ChatTemplate, read_chat_template
from .tokenizer import Tokenizer, read_json_object, special_tokens

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
    """Turns chat messages into `PromptInputs` with the checkpoint's chat template (Gemma 3n's
    when it has none). The image processor and audio feature extractor are created on first use."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: ModelConfig,
        preprocessor: Optional[dict] = None,
        chat_template: Optional[ChatTemplate] = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.preprocessor = preprocessor or {}
        self.chat_template = chat_template  # None: the built-in Gemma 3n template
        self._image_processor = None
        self._feature_extractor = None

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> "Processor":
        """The checkpoint's tokenizer, preprocessor settings and chat template, if it has one."""
        source = read_chat_template(path)
        return cls(
            Tokenizer.from_dir(path),
            config,
            _preprocessor_settings(path),
            ChatTemplate(source, special_tokens(path)) if source is not None else None,
        )

    # -- template ---------------------------------------------------------------------------

    def render(
        self,
        messages: List[Message],
        add_generation_prompt: bool = True,
        media: Optional[Callable[[dict], str]] = None,
    ) -> str:
        """The prompt text, without the leading <bos> (added as an id), by the checkpoint's
        chat template or else the built-in Gemma 3n one. Each image or audio item becomes what
        `media(item)` returns (by default one placeholder)."""
        media = media or (lambda item: PLACEHOLDERS[item["type"]])
        if self.chat_template is not None:
            return _checkpoint_template(self.chat_template, list(messages), add_generation_prompt, media)
        messages = list(messages)
        prefix = ""
        if messages and messages[0]["role"] == "system":  # kept as written, as Gemma's template does
            prefix = _text_of(messages.pop(0)["content"]) + "\n\n"
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

    def model_turn_end(self) -> str:
        """The text that closes a model turn in the chat template ("<end_of_turn>\\n" in
        Gemma's): what the template writes after an assistant message."""
        mark = "\ue000"  # a private-use character: no template trims or rewrites it
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except ValueError:  # a template that wants another conversation shape
            return "<end_of_turn>\n"
        return text.rpartition(mark)[2] if mark in text else "<end_of_turn>\n"

    # -- inputs -----------------------------------------------------------------------------

    def __call__(
        self, prompt: Prompt, add_bos: bool = True, add_generation_prompt: bool = True
    ) -> PromptInputs:
        """Messages (or a plain user prompt) -> token ids plus preprocessed images/audio."""
        messages = as_messages(prompt)
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
        from .audio.io import SAMPLING_RATE, AudioError, load_audio
        from .audio.prompt import split_audio

        samples = load_audio(*source) if isinstance(source, tuple) else load_audio(source)
        segments = split_audio(samples)
        if self.feature_extractor.num_frames(len(segments[-1])) == 0:  # no feature frame at all
            if len(segments) > 1:
                return segments[:-1]  # a remnant shorter than a frame after the last cut
            name = "audio array" if isinstance(source, tuple) else str(source)
            need = self.feature_extractor.frame_length + 1  # a frame also reads one sample before it
            raise AudioError(
                f"{name} is {1000 * len(samples) / SAMPLING_RATE:.1f} ms long, shorter than one analysis "
                f"frame: at least {need} samples at 16 kHz ({1000 * need / SAMPLING_RATE:.1f} ms) are needed"
            )
        return segments

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


def _preprocessor_settings(path: Path) -> dict:
    """Image-processor and feature-extractor settings: preprocessor_config.json, or the blocks
    of the processor_config.json that transformers 5 writes instead."""
    pre = read_json_object(path / "preprocessor_config.json")
    if pre:
        return pre
    processor = read_json_object(path / "processor_config.json")
    blocks = [processor.get(k) for k in ("feature_extractor", "image_processor")]
    return {k: v for block in blocks if isinstance(block, dict) for k, v in block.items()}


def _checkpoint_template(template: ChatTemplate, messages: List[Message], add_generation_prompt: bool, media) -> str:
    """Render with the checkpoint's template, which writes one placeholder per image/audio
    item; each is then replaced by `media(item)`, in order."""
    items, view = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            # The template sees a media item by its type only: nothing to serialise or copy.
            items += [c for c in content if _is_media(c)]
            content = [{"type": c["type"]} if _is_media(c) else c for c in content]
        view.append({**message, "content": content})
    text = template.render(view, add_generation_prompt)
    bos = template.tokens.get("bos_token")
    return _fill_media(text[len(bos):] if bos and text.startswith(bos) else text, items, media)


def _is_media(item) -> bool:
    return isinstance(item, dict) and item.get("type") in PLACEHOLDERS


def _fill_media(text: str, items: List[dict], media) -> str:
    pieces = re.split(f"({IMAGE_PLACEHOLDER}|{AUDIO_PLACEHOLDER})", text)
    queues = {kind: [c for c in items if c["type"] == kind] for kind in PLACEHOLDERS}
    for kind, placeholder in PLACEHOLDERS.items():
        written = pieces[1::2].count(placeholder)
        if written != len(queues[kind]):
            raise ValueError(
                f"the checkpoint's chat template wrote {written} {kind} placeholder(s) "
                f"for {len(queues[kind])} {kind} item(s)"
            )
    kinds = {placeholder: kind for kind, placeholder in PLACEHOLDERS.items()}
    for i in range(1, len(pieces), 2):
        pieces[i] = media(queues[kinds[pieces[i]]].pop(0))
    return "".join(pieces)


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


def as_messages(prompt: Prompt) -> List[Message]:
    """A plain prompt as one user message; chat messages checked for the shape the template
    needs, so that a malformed prompt fails by name (never as a KeyError or a tokenizer cast
    error)."""
    if isinstance(prompt, str):
        prompt = [user_message(prompt)]
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    for i, message in enumerate(prompt):
        where = f"message {i}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where} must be a dict with a string 'role', got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, str):
            _check_text(content, where)
        elif isinstance(content, (list, tuple)):
            for item in content:
                _check_item(item, where)
        else:
            raise ValueError(f"{where} ({message['role']}) needs 'content': a string or a list of items")
    return list(prompt)


def _check_item(item, where: str) -> None:
    kind = item.get("type") if isinstance(item, dict) else None
    if kind not in ("text", *PLACEHOLDERS):
        raise ValueError(f"{where}: content items must be dicts of type text, image or audio, got {item!r:.80}")
    if kind not in item:
        raise ValueError(f"{where}: a {kind} item needs a {kind!r} entry")
    if kind == "text":
        _check_text(item["text"], where)


def _check_text(text, where: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: text holds a lone surrogate {text[e.start]!r} at position {e.start}, which is "
            "not valid Unicode (decode bytes with errors='replace', or fix the source)"
        ) from None
