"""AVF-MAE++ training: the one entry point, launched by DeepSpeed's launcher.

    deepspeed train.py --config ds_configs/huge.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py --config ds_configs/tiny.json

The config is DeepSpeed's JSON plus an ``avfmae`` section (see avfmae/train_config.py: TrainConfig);
``--set key=value`` overrides a key of that section (value parsed as JSON when it parses).
Stages (PSI, paper §3.5): ``pretrain`` (self-supervised), ``postpretrain`` (supervised on a labelled
hybrid manifest), ``finetune`` (target dataset); the latter two start from ``init_checkpoint``, a
plain fp32 state dict exported by the previous stage (``<output_dir>/model_fp32.pt``).

Outputs in ``output_dir``: ``checkpoints/`` (DeepSpeed, resumable with ``--resume``),
``log.jsonl``, ``model_fp32.pt`` (consolidated weights), ``best_fp32.pt`` and ``metrics.json`` when
there is a validation set, ``reconstructions.png`` after pre-training.

Exit status (:class:`avfmae.stopping.ExitCode`): 0 the schedule ran to the end; 2 a bad config; 3 the run
stopped to protect its work (non-finite loss, output_dir in use, no usable checkpoint); 4 stopped at
``stop_at_step`` and 5 stopped by SIGTERM/SIGINT, both with a checkpoint to ``--resume`` from.
"""

from __future__ import annotations

import argparse
import os
import sys

from avfmae.training import ConfigError, ExitCode, RunError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with an 'avfmae' section")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the avfmae section, e.g. --set max_steps=20")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the DeepSpeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ds_config, cfg = load_config(args.config, args.overrides)
    except ConfigError as err:  # before any process group exists: fail fast and readable
        print(f"train.py: bad config: {err}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    from avfmae.trainer import Trainer  # heavy imports (deepspeed, dali) only after validation

    try:
        return int(Trainer(ds_config, cfg, resume=args.resume, local_rank=args.local_rank).run())
    except ConfigError as err:  # found once the run started (init_checkpoint contents, manifest labels)
        print(f"train.py: bad config: {err}", file=sys.stderr, flush=True)
        return ExitCode.CONFIG_ERROR
    except RunError as err:  # raised on every rank alike: nothing was lost, nothing garbage was written
        print(f"train.py: stopped: {err}", file=sys.stderr, flush=True)
        return ExitCode.RUN_ERROR


if __name__ == "__main__":
    sys.exit(main())
