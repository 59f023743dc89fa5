"""Entry point: prepare data, run the Ray Train job, write results.json, print the metrics table.

    python -m trainer.train --config configs/smoke.yaml [section.key=value ...] [--resume]

Starts a local Ray instance, or joins the cluster named by RAY_ADDRESS.
"""

import argparse
import json
import sys
from typing import Optional, Sequence

from trainer.config import load_config
from trainer.launch import run
from trainer.report import RESULTS_MARKER, print_table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file in configs/ (default: built-in defaults)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    p.add_argument("--print-results", action="store_true", help="also print results.json as one log line (for job logs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.kernel_size=64")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    results = run(cfg, resume=args.resume)
    print_table(results)
    if args.print_results:
        print(RESULTS_MARKER + json.dumps(results, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
