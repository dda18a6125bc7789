"""One-time conversion of the reference's OpenUni checkpoint into an OpenUni folder the trainer reads:

    python -m twinflow.backbones.openuni.convert --checkpoint openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth \\
        --sana-config models/Sana_1600M_512px_diffusers/transformer --internvl models/InternVL3-2B-hf \\
        --vae models/dc-ae-f32c32-sana-1.0-diffusers --out models/openuni

The ``.pth`` is read with ``torch.load(weights_only=True)`` (a file that needs more than tensors is
refused, naming it); SANA and the query head are written as safetensors (``transformer/``,
``query_head/``, see ``reference_checkpoint.convert_reference_checkpoint``). ``internvl/`` and ``vae/`` are
symbolic links to the given folders (the frozen InternVL3 in its Hugging Face layout, the DC-AE in
diffusers'), so the result is both ``model.pretrained`` and the ``encoder.model_path`` of the precompute.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import FOLDERS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twinflow.backbones.openuni.convert",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the reference's .pth")
    parser.add_argument("--sana-config", required=True, help="folder with SANA's config.json (its transformer/)")
    parser.add_argument("--internvl", required=True, help="the InternVL3-2B folder (Hugging Face layout, with tokenizer)")
    parser.add_argument("--vae", required=True, help="the DC-AE folder (diffusers layout)")
    parser.add_argument("--out", required=True, help="the OpenUni folder to write")
    parser.add_argument("--query-head-config", default=None,
                        help="a query head folder whose config.json shapes the head (default: OpenUni-L's)")
    args = parser.parse_args(argv)
    from .reference_checkpoint import ReferenceCheckpointError, convert_reference_checkpoint

    for flag, folder in (("--sana-config", args.sana_config), ("--internvl", args.internvl), ("--vae", args.vae)):
        if not (Path(folder) / "config.json").is_file():
            print(f"error: {flag} {folder}: no config.json there", file=sys.stderr)
            return 2
    head = None
    if args.query_head_config is not None:
        import json

        from .query_head import QueryHeadConfig

        head = QueryHeadConfig(**json.loads((Path(args.query_head_config) / "config.json").read_text()))
    try:
        out = convert_reference_checkpoint(args.checkpoint, args.out, args.sana_config, head)
    except (ReferenceCheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, target in (("internvl", args.internvl), ("vae", args.vae)):
        link = out / FOLDERS[name]
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(target).resolve(), target_is_directory=True)
    print(f"OpenUni folder written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
