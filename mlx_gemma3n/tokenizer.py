"""Gemma 3n's tokenizer, from the checkpoint's `tokenizer.model` (SentencePiece) or, when a
converter wrote none (transformers 5 era mlx-vlm / mlx-lm conversions), its `tokenizer.json`."""

import json
from pathlib import Path
from typing import Iterable, List


class Tokenizer:
    """Encodes text (special tokens such as `<start_of_turn>` are parsed as single ids) and
    decodes ids; `eos_token_ids` holds every id that ends a model turn."""

    def __init__(self, model_file):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_file}")
        self._backend = _TokenizersJson(model_file) if model_file.suffix == ".json" else _SentencePiece(model_file)
        self.bos_token_id = self._backend.bos_id
        self.pad_token_id = self._backend.pad_id
        ends = [self._backend.eos_id, self.token_id("<end_of_turn>")]
        self.eos_token_ids = {i for i in ends if i >= 0}

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        """The tokenizer of a checkpoint directory: `tokenizer.model`, else `tokenizer.json`."""
        for name in ("tokenizer.model", "tokenizer.json"):
            if (Path(path) / name).is_file():
                return cls(Path(path) / name)
        raise FileNotFoundError(f"tokenizer file not found: {path} has neither tokenizer.model nor tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def token_id(self, piece: str) -> int:
        """The id of a special piece, or -1 if the vocabulary lacks it."""
        return self._backend.piece_to_id(piece)

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        ids = self._backend.encode(text)
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Ids past the tokenizer's pieces (Gemma 3n's embedding has 256 more:
        the towers' soft-token slots, which a sampler can still pick) have no text."""
        return self._backend.decode([i for i in ids if 0 <= i < self.vocab_size])

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class _SentencePiece:
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot read SentencePiece model {model_file}: {e}") from None
        self.bos_id, self.pad_id, self.eos_id = self.sp.bos_id(), self.sp.pad_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        return -1 if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode(ids)


class _TokenizersJson:
    """A Hugging Face `tokenizer.json` read with the `tokenizers` library (no transformers).
    Which tokens are <bos>/<eos>/<pad> comes from `tokenizer_config.json` beside it."""

    def __init__(self, file: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise ValueError(f"cannot read tokenizer {file}: {e}") from None
        special = special_tokens(file.parent)
        self.bos_id = self.piece_to_id(special.get("bos_token", "<bos>"))
        self.eos_id = self.piece_to_id(special.get("eos_token", "<eos>"))
        self.pad_id = self.piece_to_id(special.get("pad_token", "<pad>"))
        # SentencePiece decodes these control tokens to nothing; keep that behaviour.
        self.silent = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}
        self.vocab_size = self.tok.get_vocab_size()

    def piece_to_id(self, piece: str) -> int:
        i = self.tok.token_to_id(piece)
        return -1 if i is None else i

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.silent], skip_special_tokens=False)


def special_tokens(directory: Path) -> dict:
    """String-valued `*_token` entries of the tokenizer_config.json in `directory`
    ({"bos_token": "<bos>", ...}; AddedToken dicts unwrapped)."""
    out = {}
    for key, value in read_json_object(Path(directory) / "tokenizer_config.json").items():
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def read_json_object(file: Path) -> dict:
    """A JSON file's top-level object; {} when the file is absent or holds no object."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


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
