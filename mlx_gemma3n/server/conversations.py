"""The KV caches of recent conversations, for requests that extend one of them.

A cache is reused only when the ids it holds begin the new prompt *and* the images and audio
clips behind its placeholders are the same ones (by digest): placeholder ids do not change
with the picture, so matching ids alone would answer about a picture the client never sent.
A reply the client sends back must re-tokenize to the generated ids (less the last) for its
conversation to match."""

import hashlib
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np

from ..api import PromptCache
from ..processor import PromptInputs

MediaKey = Tuple[Tuple[str, ...], Tuple[str, ...]]  # (image digests, audio digests)


def media_key(inputs: PromptInputs) -> MediaKey:
    """Digests of the preprocessed images and audio clips, in placeholder order."""

    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    return tuple(map(digest, inputs.images)), tuple(map(digest, inputs.audio))


@dataclass
class _Slot:
    cache: PromptCache
    media: MediaKey

    def held(self) -> List[int]:
        """The ids whose keys and values are in the cache: the last generated id, which is
        never fed back, is not, so a reply of one token does not need to round-trip."""
        return self.cache.tokens[: self.cache.processed]

    def holds_prefix_of(self, ids: List[int], media: MediaKey) -> bool:
        held = self.held()
        same_media = all(new[: len(old)] == old for old, new in zip(self.media, media))
        return 0 < len(held) < len(ids) and ids[: len(held)] == held and same_media


class ConversationCaches:
    """Up to `slots` caches, least recently used first; `new_cache()` makes an empty one."""

    def __init__(self, new_cache: Callable[[], PromptCache], slots: int):
        self.new_cache, self.slots = new_cache, slots
        self._slots: List[_Slot] = []

    def take(self, ids: List[int], media: MediaKey) -> PromptCache:
        """The cache to generate `ids` with: the one holding their longest prefix with the same
        media, else an empty one (replacing the least recently used). It is recorded as
        holding this prompt's media from now on."""
        matches = [s for s in self._slots if s.holds_prefix_of(ids, media)]
        if matches:
            slot = max(matches, key=lambda s: len(s.held()))
            slot.cache.tokens = slot.held()
            self._slots.remove(slot)
        else:
            if len(self._slots) >= self.slots:
                self._slots.pop(0)
            slot = _Slot(self.new_cache(), media)
        slot.media = media
        self._slots.append(slot)
        return slot.cache

    def discard(self, cache: PromptCache) -> None:
        """Forget `cache` (after a failed generation it may be half-written)."""
        self._slots = [s for s in self._slots if s.cache is not cache]
