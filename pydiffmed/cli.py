"""The `pydiffmed` command."""
from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import torch

    import pydiffmed
    from pydiffmed import backends

    print(f"pydiffmed {pydiffmed.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: no device")
    print("backends:")
    for line in backends.describe().splitlines():
        print("  " + line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydiffmed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="backends, devices and versions")
    info.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
