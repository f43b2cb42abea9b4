"""SentencePiece tokenizer for Gemma 3n (the checkpoint's `tokenizer.model`)."""

from pathlib import Path
from typing import Iterable, List

import sentencepiece as spm


class Tokenizer:
    """Encodes text (special tokens such as `<start_of_turn>` are parsed as single ids) and
    decodes ids; `eos_token_ids` holds every id that ends a model turn."""

    def __init__(self, model_file):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_file}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot read SentencePiece model {model_file}: {e}") from None
        self.bos_token_id = self.sp.bos_id()
        self.pad_token_id = self.sp.pad_id()
        ends = [self.sp.eos_id(), self.token_id("<end_of_turn>")]
        self.eos_token_ids = {i for i in ends if i >= 0}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_id(self, piece: str) -> int:
        """The id of a special piece, or -1 if the vocabulary lacks it."""
        i = self.sp.piece_to_id(piece)
        return -1 if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a growing id sequence into text pieces without splitting multi-byte characters.

    Gemma's tokenizer adds no dummy prefix, so decoding consecutive runs of ids separately and
    joining them gives the full decode; only a run ending inside a UTF-8 character is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._pending: List[int] = []
        self._pieces: List[str] = []

    def add(self, token_id: int) -> str:
        """Add one id; return the newly completed text (may be empty)."""
        self._pending.append(token_id)
        piece = self._tok.decode(self._pending)
        if piece.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next byte token
        self._pending = []
        self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self._pieces) + self._tok.decode(self._pending)
