"""`python -m experiments.reproduce <claim> [--small | --full] [--out DIR]`: run one reproduction,
print the paper's figures beside ours with their ratio, write result.json + <claim>.png.

Small (seconds on a CPU) is the default on a CPU, full (GPU-sized) on a GPU.
"""
import os

# The sharding claims need the 8-device CPU mesh; jax reads this on first backend use.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402

from experiments.reproduce import CLAIMS  # noqa: E402
from experiments.reproduce.common import environment, format_comparisons, on_gpu, write  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("claim", choices=CLAIMS + ("all",), help="which result to reproduce")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CPU/CI size (default without a GPU)")
    size.add_argument("--full", action="store_true", help="GPU size (default on a GPU)")
    parser.add_argument("--out", help="output folder for result.json and <claim>.png (default "
                        "runs/reproduce/<claim>/), or a path ending in .json (the PNG goes beside it)")
    args = parser.parse_args(argv)
    small = args.small or (not args.full and not on_gpu())
    for claim in CLAIMS if args.claim == "all" else (args.claim,):
        module = importlib.import_module(f"experiments.reproduce.{claim}")
        result = module.run(small=small)
        json_path, png_path = write(claim, result, module.plot, args.out if args.claim != "all" else None)
        env = environment()
        print(f"== {claim} ({'small' if small else 'full'}) on {env['device']}, jax {env['jax']}, {env['date']}")
        print(module.format_result(result))
        print(format_comparisons(result["comparisons"]))
        print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
