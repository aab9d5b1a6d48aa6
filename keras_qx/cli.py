"""``keras-qx`` command line.

    keras-qx demo [--epochs 20] [--qat-epochs 4] [--out DIR]   the main job on the digits data
    keras-qx inspect model.tflite                               ops, INT4 tensors, sizes
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _demo(args) -> int:
    from keras_qx.demo import format_table, run_demo

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows = run_demo(epochs=args.epochs, qat_epochs=args.qat_epochs, out_dir=args.out,
                    policy=open(args.policy).read() if args.policy else None,
                    print_fn=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(rows))
    return 0


def _inspect(args) -> int:
    from keras_qx.evaluate import gzip_size
    from keras_qx.tflite import inspect_tflite, read_model

    data = read_model(args.path)
    info = inspect_tflite(data)
    print(f"{args.path}: {info.size_bytes:,} bytes ({gzip_size(data):,} gzipped), "
          f"{'fully integer' if info.fully_integer else 'float compute ops: ' + ', '.join(info.float_ops)}")
    print("ops: " + ", ".join(info.ops))
    for name, dtype, shape, nbytes in sorted(info.weights, key=lambda w: -w[3])[: args.top]:
        print(f"  {dtype:<8} {str(shape):<20} {nbytes:>10,} B  {name[:70]}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="keras-qx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, quantize (int8 and mixed 4/8-bit), export and compare on digits")
    demo.add_argument("--epochs", type=int, default=20, help="float training epochs")
    demo.add_argument("--qat-epochs", type=int, default=4, help="quantization-aware training epochs")
    demo.add_argument("--policy", help="a policy JSON file for the mixed model (default: 4-bit Dense/Conv, "
                                       "first conv and last dense 8-bit)")
    demo.add_argument("--out", help="directory for the .tflite files and the policy JSON")
    demo.set_defaults(func=_demo)
    inspect = sub.add_parser("inspect", help="show what a .tflite file holds")
    inspect.add_argument("path")
    inspect.add_argument("--top", type=int, default=20, help="largest constant tensors to list")
    inspect.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    for name in ("epochs", "qat_epochs", "top"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "policy", None) and not os.path.isfile(args.policy):
        parser.error(f"--policy {args.policy!r}: no such file")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, RuntimeError) as err:
        print(f"keras-qx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
