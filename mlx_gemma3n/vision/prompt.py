"""Image placeholder expansion, as transformers' `Gemma3nProcessor` does it.

Each image placeholder in the prompt (Gemma 3n's chat template emits `<image_soft_token>` for an
image) becomes ``"\\n\\n" + <start_of_image> + <image_soft_token> * 256 + <end_of_image> + "\\n\\n"``.

Expansion works on the prompt *string*, tokenized afterwards: that is exactly what the
transformers processor does, and it lets SentencePiece merge the "\\n\\n" with neighbouring
whitespace (e.g. "\\n" + "\\n\\n" -> "\\n\\n\\n" is one Gemma token).
"""

from __future__ import annotations


IMAGE_TOKEN = "<image_soft_token>"
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_SEQ_LENGTH = 256


def full_image_sequence(
    image_token: str = IMAGE_TOKEN,
    boi_token: str = BOI_TOKEN,
    eoi_token: str = EOI_TOKEN,
    num_tokens: int = IMAGE_SEQ_LENGTH,
) -> str:
    return f"\n\n{boi_token}{image_token * num_tokens}{eoi_token}\n\n"


def expand_image_placeholders(
    text: str,
    num_images: int | None = None,
    placeholder: str = IMAGE_TOKEN,
    image_token: str = IMAGE_TOKEN,
    boi_token: str = BOI_TOKEN,
    eoi_token: str = EOI_TOKEN,
    num_tokens: int = IMAGE_SEQ_LENGTH,
) -> str:
    """Replace every `placeholder` in `text` with the full image sequence.

    With `num_images`, the number of placeholders must match (transformers raises the same way).
    """
    count = text.count(placeholder)
    if num_images is not None and count != num_images:
        raise ValueError(
            f"prompt has {count} {placeholder} placeholders but {num_images} images were given"
        )
    return text.replace(placeholder, full_image_sequence(image_token, boi_token, eoi_token, num_tokens))
