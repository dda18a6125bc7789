"""Entry point the DeepSpeed launcher runs on every rank.

    deepspeed --num_gpus 8 --module twinflow.train --config configs/qwen_image_full.yaml [key.path=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module twinflow.train --config configs/tiny_cpu.yaml

``key.path=value`` overrides are parsed as YAML values and checked like the file (an unknown key is an
error naming it). The launcher's ``--local_rank`` argument is accepted and ignored: the rank comes from
the environment it also sets.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from twinflow.utils.typed_config import ConfigError


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twinflow.train", description="TwinFlow training (DeepSpeed ZeRO-3)")
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from twinflow.training.config import load_train_config

    try:
        config = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    from twinflow.training.trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
