"""A tiny Gemma 3n: config and SentencePiece tokenizer shared by the demo and the tests.

Shapes are small but every architectural feature is present: AltUp with four
streams, LAuReL, per-layer embeddings, sliding and global layers, KV sharing
for both layer types, activation sparsity on two layers, per-layer FFN sizes,
and all three towers. Token ids keep Gemma 3n's layout relative to the
per-layer vocabulary: text ids below it, then 128 vision ids, then 128 audio ids.
"""

import json
from pathlib import Path

import numpy as np

TEXT_VOCAB = 256  # ids with a per-layer embedding row
VOCAB = TEXT_VOCAB + 256

SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    5: "<start_of_turn>",
    6: "<end_of_turn>",
    TEXT_VOCAB - 2: "<start_of_audio>",
    TEXT_VOCAB - 1: "<start_of_image>",
    TEXT_VOCAB: "<end_of_image>",
    TEXT_VOCAB + 1: "<image_soft_token>",
    TEXT_VOCAB + 128: "<end_of_audio>",
    TEXT_VOCAB + 129: "<audio_soft_token>",
}

TINY_CONFIG = {
    "architectures": ["Gemma3nForConditionalGeneration"],
    "model_type": "gemma3n",
    "audio_soft_tokens_per_image": 188,
    "vision_soft_tokens_per_image": 256,
    "boa_token_id": TEXT_VOCAB - 2,
    "boi_token_id": TEXT_VOCAB - 1,
    "eoi_token_id": TEXT_VOCAB,
    "image_token_id": TEXT_VOCAB + 1,
    "eoa_token_id": TEXT_VOCAB + 128,
    "audio_token_id": TEXT_VOCAB + 129,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma3n_text",
        "vocab_size": VOCAB,
        "vocab_size_per_layer_input": TEXT_VOCAB,
        "hidden_size": 64,
        "intermediate_size": [96, 128, 96, 160, 96, 128, 192],
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_size_per_layer_input": 64,
        "sliding_window": 8,
        "layer_types": [
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
        "num_kv_shared_layers": 3,
        "laurel_rank": 8,
        "altup_num_inputs": 4,
        "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0],
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    },
    "vision_config": {
        "model_type": "gemma3n_vision",
        "architecture": "mobilenetv5_300m_enc",
        "model_args": {"channel_multiplier": 0.125},
        "hidden_size": 2048,
        "vocab_offset": TEXT_VOCAB,
        "vocab_size": 128,
        "rms_norm_eps": 1e-6,
        "do_pooling": False,
    },
    "audio_config": {
        "model_type": "gemma3n_audio",
        "hidden_size": 32,
        "input_feat_size": 128,
        "vocab_offset": TEXT_VOCAB + 128,
        "vocab_size": 128,
        "conf_num_hidden_layers": 2,
        "conf_num_attention_heads": 4,
        "sscp_conv_channel_size": [16, 8],
        "rms_norm_eps": 1e-6,
    },
}

_WORDS = (
    "the a of and to in is it that was he for on are as with his they at be this from "
    "have or by one had not but what all were when we there can an your which their said "
    "if do will each about how up out them then she many some so these would other into "
    "has more her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man "
    "image audio picture sound cat dog red blue green hello world describe transcribe "
    "translate english french speech model user answer question ."
).split()


def _training_corpus(path: Path, lines: int = 4000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            n = int(rng.integers(3, 14))
            f.write(" ".join(rng.choice(_WORDS, size=n)) + "\n")


def write_tiny_tokenizer(out_dir, model_type: str = "unigram") -> Path:
    """Train a SentencePiece model with `VOCAB` pieces and Gemma's special tokens at the ids
    `TINY_CONFIG` names, and write it as `tokenizer.model` (plus a `tokenizer_config.json`)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    _training_corpus(corpus)
    prefix = out_dir / "spm"
    n_normal = VOCAB - len(SPECIAL_TOKENS) - 150  # room left for <unused> fillers
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=n_normal + 4,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
        # Gemma's tokenizer keeps text verbatim: no normalisation, no dummy prefix.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        user_defined_symbols=list("\n,.!?:;'\"()-0123456789"),
    )
    proto = pb.ModelProto()
    proto.ParseFromString((prefix.with_suffix(".model")).read_bytes())
    kept = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED)
    normal = [p for p in proto.pieces if p.type in kept]
    by_id = {}
    for i, name in SPECIAL_TOKENS.items():
        kind = pb.ModelProto.SentencePiece
        if name in ("<pad>", "<eos>", "<bos>"):
            t = kind.CONTROL
        elif name == "<unk>":
            t = kind.UNKNOWN
        else:
            t = kind.USER_DEFINED
        by_id[i] = (name, 0.0, t)
    free = iter(i for i in range(VOCAB) if i not in by_id)
    for p in normal:
        by_id[next(free)] = (p.piece, p.score, p.type)
    for i in free:
        by_id[i] = (f"<unused{i}>", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED)
    del proto.pieces[:]
    for i in range(VOCAB):
        piece, score, t = by_id[i]
        proto.pieces.add(piece=piece, score=score, type=t)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    for leftover in (corpus, prefix.with_suffix(".model"), prefix.with_suffix(".vocab")):
        leftover.unlink()
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            },
            indent=2,
        )
    )
    return out_dir / "tokenizer.model"
