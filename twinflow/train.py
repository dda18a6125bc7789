"""Entry point the DeepSpeed launcher runs on every rank.

    deepspeed --num_gpus 8 --module twinflow.train --config configs/qwen_image_full.yaml [key.path=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module twinflow.train --config configs/tiny_cpu.yaml

``key.path=value`` overrides are parsed as YAML values and checked like the file (an unknown key is an
error naming it). The launcher's ``--local_rank`` argument is accepted and ignored: the rank comes from
the environment it also sets.

Every rank checks the whole config, including the files it names (:meth:`TrainConfig.check_inputs`),
before it builds anything. A problem the user can fix (a bad key, a missing file or cache, a cache built
with other settings, an unusable checkpoint) ends every rank with exit code 2 and ONE line, printed by
rank 0 only; ``TWINFLOW_TRACEBACK=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from twinflow.utils.typed_config import ConfigError


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twinflow.train", description="TwinFlow training (DeepSpeed ZeRO-3)")
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    return parser.parse_args(argv)


EXIT_USER_ERROR = 2
"""A problem with the config or the files it names."""
EXIT_RUN_FAILED = 1
"""The run started and then failed (e.g. too many non-finite steps, a checkpoint refused)."""


def _user_errors() -> tuple[type[Exception], ...]:
    from twinflow.data.stats import DataError
    from twinflow.training.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError


def _report(error: Exception, code: int) -> int:
    """One line on rank 0 (every rank gets the same error; the launcher passes the exit code on)."""
    if os.environ.get("TWINFLOW_TRACEBACK") == "1":
        raise error
    if int(os.environ.get("RANK", "0")) == 0:
        message = " ".join(str(error).split())
        kind = "" if isinstance(error, ConfigError) else f"{type(error).__name__}: "
        print(f"twinflow train: error: {kind}{message}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from twinflow.training.config import load_train_config

    try:
        config = load_train_config(args.config, args.overrides, check_inputs=True)
    except ConfigError as e:
        return _report(e, EXIT_USER_ERROR)
    from twinflow.training.trainer import NonFiniteTrainingError, Trainer

    from twinflow.training.distributed import shutdown_distributed

    try:
        try:
            trainer = Trainer(config)
        except _user_errors() as e:
            return _report(e, EXIT_USER_ERROR)
        try:
            trainer.train()
        except (*_user_errors(), NonFiniteTrainingError) as e:
            return _report(e, EXIT_RUN_FAILED)
        finally:
            trainer.close()
        return 0
    finally:
        shutdown_distributed()


def _finish(code: int) -> None:
    """End a launched rank without interpreter finalization: flush what Python buffers, then
    ``os._exit``. Training, checkpoints and the process group are done by then. Finalization is where
    C++ threads left by the collective backends can abort a rank that has finished (PyTorch's own
    attempt to fix this, pytorch/pytorch#179291, describes gloo worker threads doing so): one CI run saw a
    2-rank CPU run end with SIGABRT after its last step, with the process group already destroyed. Not
    reproduced here in 10 launches, so the cause is not proven; ``faulthandler`` (enabled in
    :func:`_launched`) prints every thread's Python stack if a rank aborts again."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _launched() -> None:
    """What the launcher runs on each rank. An error not handled in :func:`main` prints its traceback
    and ends the rank with exit code 1."""
    import faulthandler
    import traceback

    faulthandler.enable()
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported, then the rank ends like any failed process
        traceback.print_exc()
        code = EXIT_RUN_FAILED
    _finish(code)


if __name__ == "__main__":
    _launched()
