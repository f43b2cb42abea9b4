"""USM Conformer encoder vs transformers' Gemma3nAudioEncoder, float32.

Relative error is max|ours - ref| / max|ref| over all outputs. Measured on this machine (MLX
CPU): tiny config, padded batch of 3 s + 1 s clips: 5.9e-7; real E2B/E4B layer shapes (one
Conformer layer), 30 s + 4 s: 1.2e-6; weights loaded from the tiny checkpoint: 5.4e-7; end
to end into the language model's input embeddings: 4.4e-7; bfloat16 vs float32 reference: see
the test.
"""

import dataclasses
import glob

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from reference import randomize_
from safetensors.numpy import load_file
from transformers import Gemma3nAudioConfig
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

from mlx_gemma3n.audio import (
    AudioConfig,
    AudioEncoder,
    AudioFeatureExtractor,
    pad_audio_features,
)
from mlx_gemma3n.tiny import TINY_CONFIG

torch.set_num_threads(1)
SR = 16_000
PREFIX = "model.audio_tower."


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def build_pair(config: dict, seed: int = 0):
    """(randomized transformers encoder, MLX encoder holding the same weights)."""
    hf = Gemma3nAudioEncoder(Gemma3nAudioConfig(**config)).eval()
    randomize_(hf, seed)
    ours = AudioEncoder(AudioConfig.from_dict(config))
    weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    ours.load_weights(list(AudioEncoder.sanitize(weights).items()))
    return hf, ours


def features_for(*seconds, seed=0):
    rng = np.random.default_rng(seed)
    clips = [0.1 * rng.standard_normal(int(s * SR)).astype(np.float32) for s in seconds]
    return AudioFeatureExtractor()(clips)


def run_both(hf, ours, features, mask):
    with torch.no_grad():
        ref = hf(torch.from_numpy(features), torch.from_numpy(~mask))
    enc, padding = ours(mx.array(features), mx.array(~mask))
    ours_out = (np.array(enc), np.array(padding))
    return ours_out, (ref.last_hidden_state.numpy(), ref.audio_mel_mask.numpy())


def test_config_defaults_match_transformers_and_from_dict_ignores_unknown_keys():
    hf = Gemma3nAudioConfig()
    for field in dataclasses.fields(AudioConfig):
        ref = getattr(hf, field.name)
        if field.name.startswith("sscp_conv") and field.name.endswith("_size"):
            ref = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in ref)
        assert getattr(AudioConfig(), field.name) == ref, field.name
    d = {**TINY_CONFIG["audio_config"], "sscp_conv_kernel_size": [[3, 3], [3, 3]]}
    config = AudioConfig.from_dict(d)
    assert config.hidden_size == 32 and config.sscp_conv_kernel_size == ((3, 3), (3, 3))


def test_tiny_parity_padded_batch_longer_than_a_chunk():
    hf, ours = build_pair(TINY_CONFIG["audio_config"])
    # 3 s = 75 subsampled steps, past the 12-step attention chunk; the 1 s clip is padded.
    features, mask = features_for(3.0, 1.0)
    (enc, padding), (ref, ref_padding) = run_both(hf, ours, features, mask)
    assert enc.shape == ref.shape == (2, 19, 32)
    np.testing.assert_array_equal(padding, ref_padding)
    assert padding[1].any() and not padding[0].any()
    assert rel_err(enc, ref) <= 1e-4
    assert np.all(enc[padding] == 0)


def test_bfloat16_runs_close_to_float32():
    hf, ours = build_pair(TINY_CONFIG["audio_config"])
    features, mask = features_for(2.0, 1.0)
    (_, _), (ref, _) = run_both(hf, ours, features, mask)
    ours.set_dtype(mx.bfloat16)
    enc, _ = ours(mx.array(features, dtype=mx.bfloat16), mx.array(~mask))
    assert enc.dtype == mx.bfloat16
    assert rel_err(enc.astype(mx.float32), ref) <= 0.05  # measured 1.8e-2


def test_real_shapes_one_layer_30_seconds_gives_188_steps():
    config = {k: getattr(Gemma3nAudioConfig(), k) for k in dataclasses.asdict(AudioConfig())}
    config["conf_num_hidden_layers"] = 1  # every layer has the same shapes; one keeps this fast
    hf, ours = build_pair(config)
    features, mask = features_for(30.0, 4.0)
    (enc, padding), (ref, ref_padding) = run_both(hf, ours, features, mask)
    assert enc.shape == ref.shape == (2, 188, 1536)
    np.testing.assert_array_equal(padding, ref_padding)
    assert rel_err(enc, ref) <= 1e-4


def test_full_default_parameter_tree_matches_checkpoint_names_and_shapes():
    with torch.device("meta"):
        hf = Gemma3nAudioEncoder(Gemma3nAudioConfig())
    ours = dict(tree_flatten(AudioEncoder(AudioConfig()).parameters()))  # lazy: never materialised
    hf_weights = {k: mx.zeros(v.shape) for k, v in hf.state_dict().items()}
    sanitized = AudioEncoder.sanitize(hf_weights)
    assert set(sanitized) == set(ours)
    assert all(sanitized[k].shape == ours[k].shape for k in ours)
    assert ours["subsample_conv_projection.conv_0.conv.weight"].shape == (128, 3, 3, 1)


def test_sanitize_is_idempotent():
    hf, _ = build_pair(TINY_CONFIG["audio_config"])
    once = AudioEncoder.sanitize({k: mx.array(v.numpy()) for k, v in hf.state_dict().items()})
    twice = AudioEncoder.sanitize(once)
    for name, w in once.items():
        assert twice[name].shape == w.shape and mx.array_equal(twice[name], w), name
    assert once["conformer.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 5, 1)
    assert once["subsample_conv_projection.conv_1.conv.weight"].shape == (8, 3, 3, 16)


def load_audio_tower(checkpoint_dir) -> AudioEncoder:
    weights = {}
    for path in glob.glob(str(checkpoint_dir / "*.safetensors")):
        for name, tensor in load_file(path).items():
            if name.startswith(PREFIX):
                weights[name[len(PREFIX) :]] = mx.array(tensor)
    model = AudioEncoder(AudioConfig.from_dict(TINY_CONFIG["audio_config"]))
    model.load_weights(list(AudioEncoder.sanitize(weights).items()))  # strict: every name must match
    return model


def test_loads_checkpoint_by_name(tiny_hf):
    path, hf_model = tiny_hf
    ours = load_audio_tower(path)
    features, mask = features_for(2.5, 0.7, seed=3)
    (enc, padding), (ref, ref_padding) = run_both(hf_model.model.audio_tower, ours, features, mask)
    np.testing.assert_array_equal(padding, ref_padding)
    assert rel_err(enc, ref) <= 1e-4


def test_end_to_end_audio_embeddings_in_the_prompt(tiny_hf):
    """Our features + encoder + pad_audio_features + placeholder ids reproduce the
    embeddings transformers' Gemma3nModel hands to its language model."""
    path, hf_model = tiny_hf
    cfg = hf_model.config
    ours = load_audio_tower(path)
    features, mask = features_for(2.0, 0.5, seed=4)
    prompt = [2, 9, cfg.audio_token_id, 10]
    soft = [7, 7, cfg.boa_token_id] + [cfg.audio_token_id] * 188 + [cfg.eoa_token_id, 7, 7]
    ids = prompt[:2] + soft + prompt[3:]
    captured = {}
    hook = hf_model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            hf_model.model(
                input_ids=torch.tensor([ids, ids]),
                input_features=torch.from_numpy(features),
                input_features_mask=torch.from_numpy(mask),
            )
    finally:
        hook.remove()
    ref = captured["embeds"].numpy()[:, np.array(ids) == cfg.audio_token_id]

    enc, padding = ours(mx.array(features), mx.array(~mask))
    embed = hf_model.model.embed_audio  # the multimodal embedder is not part of the audio tower
    with torch.no_grad():
        soft = embed(inputs_embeds=torch.from_numpy(np.array(enc))).numpy()
        pad_id = embed.vocab_offset + embed.vocab_size - 1
        pad_embedding = embed(input_ids=torch.tensor([pad_id])).numpy()[0]
    got = pad_audio_features(mx.array(soft), padding, mx.array(pad_embedding))
    assert got.shape == (2, 188, cfg.text_config.hidden_size)
    assert rel_err(got, ref) <= 1e-4
    assert np.array_equal(np.array(got[1, -1]), pad_embedding)


def test_pad_audio_features_rejects_more_steps_than_slots():
    with pytest.raises(ValueError, match="split_audio"):
        pad_audio_features(mx.zeros((1, 189, 4)), mx.zeros((1, 189), mx.bool_), mx.zeros((4,)))

