"""Run mlx-vlm's own converter on a checkpoint that has no processor files.

`python -m mlx_vlm.convert` loads the HF processor (tokenizer + image processor + audio
feature extractor) only to save it beside the weights; the random benchmark checkpoints have
a tokenizer but no preprocessor_config.json, so that step fails before anything is written.
This wraps `mlx_vlm.convert.convert` with the processor left out (mlx-vlm then copies the
checkpoint's json/model files verbatim); weights, casting and quantization are mlx-vlm's own.

    python bench/vlm_convert.py --hf-path HF_DIR --mlx-path OUT [-q --q-bits 4 --q-group-size 64]
"""

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-path", required=True)
    p.add_argument("--mlx-path", required=True)
    p.add_argument("-q", "--quantize", action="store_true")
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--dtype", default=None)
    args = p.parse_args(argv)

    import importlib

    # `mlx_vlm.convert` the attribute is the function (re-exported); we need the module.
    vlm_convert = importlib.import_module("mlx_vlm.convert")
    from mlx_vlm.utils import load_config, load_model

    class _NoProcessor:
        pass

    def fetch_from_hub(model_path, lazy=False, **kwargs):
        return load_model(model_path, lazy, **kwargs), load_config(model_path, **kwargs), _NoProcessor()

    vlm_convert.fetch_from_hub = fetch_from_hub
    vlm_convert.convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
    )


if __name__ == "__main__":
    main()
