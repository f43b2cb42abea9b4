"""tokenizer.json (what transformers-5 era converters write) vs the SentencePiece tokenizer.model
it was made from, and vs transformers' own tokenizer."""

import shutil

import pytest
from transformers import AutoTokenizer

from mlx_gemma3n.tiny import write_tiny_tokenizer
from mlx_gemma3n.tokenizer import Tokenizer

TEXTS = [
    "hello world",
    "<start_of_turn>user\nDescribe the cat.<end_of_turn>\n<start_of_turn>model\n",
    "  two  spaces\n\nand a tab\t! the dog, the cat; 42?",
    "héllo wörld 猫",  # characters outside the tiny vocabulary
    "<start_of_image><image_soft_token><image_soft_token><end_of_image>x",
    "",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(tokenizer.model dir, tokenizer.json-only dir converted by transformers). Gemma's
    SentencePiece model is BPE, which transformers converts faithfully."""
    sp_dir = tmp_path_factory.mktemp("sp")
    write_tiny_tokenizer(sp_dir, "bpe")
    json_dir = tmp_path_factory.mktemp("json")
    AutoTokenizer.from_pretrained(sp_dir).save_pretrained(json_dir)
    (json_dir / "tokenizer.model").unlink(missing_ok=True)
    return sp_dir, json_dir


def test_tokenizer_json_encodes_and_decodes_as_sentencepiece(pair):
    sp, tj = Tokenizer(pair[0] / "tokenizer.model"), Tokenizer.from_dir(pair[1])
    hf = AutoTokenizer.from_pretrained(pair[1])
    for text in TEXTS:
        ids = sp.encode(text, add_bos=True)
        assert tj.encode(text, add_bos=True) == ids
        assert hf.encode(text, add_special_tokens=False) == ids[1:]
        known = [i for i in ids if i != hf.unk_token_id]  # <unk> prints as " ⁇ " / "<unk>"
        assert tj.decode(known + [sp.pad_token_id]) == sp.decode(known + [sp.pad_token_id])
        a, b = sp.detokenizer(), tj.detokenizer()
        assert [a.add(i) for i in known] == [b.add(i) for i in known]
    for attr in ("bos_token_id", "pad_token_id", "eos_token_ids", "vocab_size"):
        assert getattr(tj, attr) == getattr(sp, attr), attr
    assert tj.token_id("<end_of_turn>") == sp.token_id("<end_of_turn>") == 6
    assert tj.token_id("<not_a_piece>") == sp.token_id("<not_a_piece>") == -1


def test_tokenizer_model_wins_and_missing_or_bad_files_are_named(pair, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(pair[1], both)
    shutil.copy(pair[0] / "tokenizer.model", both)
    assert type(Tokenizer.from_dir(both)._backend).__name__ == "_SentencePiece"
    (both / "tokenizer.model").unlink()
    (both / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has neither tokenizer.model nor tokenizer.json"):
        Tokenizer.from_dir(both)
    (both / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer .*tokenizer.json"):
        Tokenizer.from_dir(both)


def test_ids_past_the_tokenizer_decode_to_nothing(pair):
    """The model's vocabulary is larger than the tokenizer's (soft-token slots); such an id
    sampled mid-reply must not crash decoding (SentencePiece raised IndexError)."""
    for tok in (Tokenizer(pair[0] / "tokenizer.model"), Tokenizer.from_dir(pair[1])):
        ids = tok.encode("hello world")
        past = [tok.vocab_size, tok.vocab_size + 255]
        assert tok.decode(ids[:1] + past + ids[1:]) == tok.decode(ids) == "hello world"
        d = tok.detokenizer()
        assert "".join(d.add(i) for i in ids[:1] + past + ids[1:]) == "hello world"
