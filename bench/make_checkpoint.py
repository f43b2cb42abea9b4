"""Random-weight Gemma 3n checkpoints with the real tensor names and shapes (benchmark-only).

Writes what google/gemma-3n-E2B-it / -E4B-it look like on disk -- the 2025 (transformers 4.53)
dialect: `rope_theta` / `rope_local_base_freq` in the config, K/V weights still present for the
KV-shared layers, `model.language_model.*`, `model.vision_tower.timm_model.*`,
`model.audio_tower.*`, `model.embed_vision.*`, `model.embed_audio.*`, bf16 safetensors shards
plus `model.safetensors.index.json`, and a `tokenizer.model`.

Tensor names and shapes come from transformers' `Gemma3nForConditionalGeneration` built on
the meta device (no memory); the data are random (N(0, 0.02) for matrices, 1 + N(0, 0.02) for
vectors such as norm scales) so that no page is zero and nothing is free to map.

    python bench/make_checkpoint.py --shape E2B --out /work/bench-cache/E2B-hf
"""

import argparse
import copy
import functools
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

TINY = Path(__file__).resolve().parent.parent / "mlx_gemma3n" / "tiny.py"
SHARD_BYTES = 4 << 30
CHUNK = 1 << 24  # values generated per step (64 MiB of float32)

# The text_config of google/gemma-3n-E2B-it's config.json (transformers 4.53 dialect);
# E4B differs in layers, FFN width and KV sharing only.
_TEXT_BASE = {
    "model_type": "gemma3n_text",
    "altup_active_idx": 0,
    "altup_coef_clip": 120.0,
    "altup_correct_scale": True,
    "altup_lr_multiplier": 1.0,
    "altup_num_inputs": 4,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2048,
    "hidden_size_per_layer_input": 256,
    "initializer_range": 0.02,
    "laurel_rank": 64,
    "max_position_embeddings": 32768,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 262400,
    "vocab_size_per_layer_input": 262144,
}

_AUDIO = {
    "model_type": "gemma3n_audio",
    "conf_attention_chunk_size": 12,
    "conf_attention_context_left": 13,
    "conf_attention_context_right": 0,
    "conf_attention_logit_cap": 50.0,
    "conf_conv_kernel_size": 5,
    "conf_num_attention_heads": 8,
    "conf_num_hidden_layers": 12,
    "conf_reduction_factor": 4,
    "conf_residual_weight": 0.5,
    "gradient_clipping": 10000000000.0,
    "hidden_size": 1536,
    "input_feat_size": 128,
    "rms_norm_eps": 1e-06,
    "sscp_conv_channel_size": [128, 32],
    "sscp_conv_group_norm_eps": 0.001,
    "sscp_conv_kernel_size": [[3, 3], [3, 3]],
    "sscp_conv_stride_size": [[2, 2], [2, 2]],
    "torch_dtype": "bfloat16",
    "vocab_offset": 262272,
    "vocab_size": 128,
}

_VISION = {
    "model_type": "gemma3n_vision",
    "architecture": "mobilenetv5_300m_enc",
    "do_pooling": False,
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "model_args": None,
    "num_classes": 2,
    "label_names": ["LABEL_0", "LABEL_1"],
    "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
    "vocab_offset": 262144,
    "vocab_size": 128,
}


def _google_config(layers: int, intermediate: int, kv_shared: int) -> dict:
    text = dict(_TEXT_BASE)
    text.update(
        num_hidden_layers=layers,
        intermediate_size=[intermediate] * layers,
        num_kv_shared_layers=kv_shared,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (layers - 10),
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
    )
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "audio_config": copy.deepcopy(_AUDIO),
        "audio_soft_tokens_per_image": 188,
        "audio_token_id": 262273,
        "boa_token_id": 256000,
        "boi_token_id": 255999,
        "eoa_token_id": 262272,
        "eoi_token_id": 262144,
        "eos_token_id": [1, 106],
        "image_token_id": 262145,
        "initializer_range": 0.02,
        "text_config": text,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.0.dev0",
        "vision_config": copy.deepcopy(_VISION),
        "vision_soft_tokens_per_image": 256,
    }


@functools.lru_cache(maxsize=None)
def _tiny():
    """mlx_gemma3n/tiny.py loaded on its own: the package's __init__ imports MLX, which a GPU
    machine installs only after its checkpoints have started building (bench/device_run.py)."""
    spec = importlib.util.spec_from_file_location("_gemma3n_tiny", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_config() -> dict:
    """mlx_gemma3n.tiny's config in the 2025 dialect, for dry runs. Two changes so that mlx-vlm
    can load it too: one FFN width for all layers, and the full-size vision tower (mlx-vlm
    ignores `model_args`; the tower is ~0.3B parameters, ~0.6 GB)."""
    cfg = copy.deepcopy(_tiny().TINY_CONFIG)
    cfg["vision_config"].pop("model_args", None)
    text = cfg["text_config"]
    text["intermediate_size"] = [128] * text["num_hidden_layers"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["full_attention"]["rope_theta"]
    text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    text["rope_scaling"] = None
    cfg["torch_dtype"] = "bfloat16"
    return cfg


SHAPES = {
    "tiny": _tiny_config,
    "E2B": lambda: _google_config(layers=30, intermediate=8192, kv_shared=10),
    "E4B": lambda: _google_config(layers=35, intermediate=16384, kv_shared=15),
}


def tensor_specs(config: dict) -> dict:
    """{name: shape} of every tensor a 2025 Google checkpoint with this config holds."""
    import torch
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    hf = Gemma3nConfig(**{k: v for k, v in copy.deepcopy(config).items() if k != "architectures"})
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(hf)
    specs = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # 2025 checkpoints still carry K/V projections (and k_norm) for the KV-shared layers,
    # which transformers 5 no longer builds.
    t = config["text_config"]
    n, shared = t["num_hidden_layers"], t["num_kv_shared_layers"]
    kv, d, hd = t["num_key_value_heads"] * t["head_dim"], t["hidden_size"], t["head_dim"]
    for i in range(n - shared, n):
        p = f"model.language_model.layers.{i}.self_attn"
        specs.setdefault(f"{p}.k_proj.weight", (kv, d))
        specs.setdefault(f"{p}.v_proj.weight", (kv, d))
        specs.setdefault(f"{p}.k_norm.weight", (hd,))
    return dict(sorted(specs.items()))


def _random_bf16(rng: np.random.Generator, n: int, vector: bool) -> np.ndarray:
    """n bf16 values (as uint16 bits): N(0, 0.02), or 1 + N(0, 0.02) for vectors."""
    x = rng.standard_normal(n, dtype=np.float32)
    x *= 0.02
    if vector:
        x += 1.0
    # Round to nearest bf16 (no NaNs here, so the simple carry trick is exact enough).
    bits = x.view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def _plan_shards(specs: dict, shard_bytes: int) -> list:
    shards, current, size = [], [], 0
    for name, shape in specs.items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


def _write_shard(file: Path, names: list, specs: dict, rng: np.random.Generator) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = int(np.prod(specs[name])) * 2
        header[name] = {"dtype": "BF16", "shape": list(specs[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            total = int(np.prod(specs[name]))
            vector = len(specs[name]) == 1
            for start in range(0, total, CHUNK):
                f.write(_random_bf16(rng, min(CHUNK, total - start), vector).tobytes())
    return offset


def build(shape: str, out: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the checkpoint to `out` (via a temporary directory; skipped if `out` exists)."""
    out = Path(out)
    if (out / "model.safetensors.index.json").is_file():
        return out
    config = SHAPES[shape]()
    specs = tensor_specs(config)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rng = np.random.default_rng(seed)
        plan = _plan_shards(specs, shard_bytes)
        index = {"metadata": {"total_size": 0}, "weight_map": {}}
        t0 = time.perf_counter()
        for i, names in enumerate(plan, 1):
            name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            index["metadata"]["total_size"] += _write_shard(tmp / name, names, specs, rng)
            index["weight_map"].update({k: name for k in names})
            print(f"  [{shape}] wrote {name} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _tiny().write_tiny_tokenizer(tmp)  # ids only need to be valid: prompts are random ids
        n_params = sum(int(np.prod(s)) for s in specs.values())
        (tmp / "README.md").write_text(
            f"Random-weight Gemma 3n ({shape} shapes, {n_params / 1e9:.3f}B parameters, bf16), "
            f"built by bench/make_checkpoint.py with seed {seed}. Benchmark use only.\n"
        )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build(args.shape, args.out, args.seed))


if __name__ == "__main__":
    main()
