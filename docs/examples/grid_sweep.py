"""Grid sweep on a labq job array: each array task runs one point of a parameter matrix.

Polyaxon-style matrix, one job per combination, at most N at once:

    MATRIX='{"lr": [0.001, 0.0001, 0.00001], "batch": [32, 64]}'
    python3 grid_sweep.py --matrix "$MATRIX" --count          # prints 6: use --array 0-5
    labq submit --array 0-5%2 --gpus 1 --name grid -- \
        python3 grid_sweep.py --matrix "$MATRIX" -- python3 train.py --epochs 10

Task ``LABQ_ARRAY_INDEX`` = i runs ``python3 train.py --epochs 10 --lr <..> --batch <..>`` with the
i-th combination (keys in the order given, the last key varying fastest), so a result can always be
traced back to its point: ``grid_sweep.py --matrix "$MATRIX" --show 4``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any


def points(matrix: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not matrix or not all(isinstance(v, list) and v for v in matrix.values()):
        raise SystemExit("grid_sweep: --matrix must map each parameter to a non-empty list of values")
    keys = list(matrix)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*matrix.values())]


def as_args(point: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in point.items():
        out += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return out


def main() -> int:
    argv = sys.argv[1:]
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", required=True, help='JSON object, e.g. {"lr": [0.1, 0.01]}')
    parser.add_argument("--count", action="store_true", help="print the number of points and exit")
    parser.add_argument("--show", type=int, metavar="I", help="print point I and exit")
    args = parser.parse_args(argv)
    grid = points(json.loads(args.matrix))
    if args.count:
        print(len(grid))
        return 0
    index = args.show if args.show is not None else int(os.environ.get("LABQ_ARRAY_INDEX", "-1"))
    if not 0 <= index < len(grid):
        last = len(grid) - 1
        raise SystemExit(f"grid_sweep: index {index} is outside 0-{last} (use --array 0-{last})")
    if args.show is not None or not command:
        print(json.dumps(grid[index]))
        return 0
    argv_out = command + as_args(grid[index])
    print(f"grid point {index}/{len(grid)}: {json.dumps(grid[index])}", flush=True)
    os.execvp(argv_out[0], argv_out)  # noqa: S606 - runs the user's own training command
    return 1  # not reached: execvp replaces this process


if __name__ == "__main__":
    raise SystemExit(main())
