"""The ``bitcompile`` command line.

bitcompile compile LAYERS.bit [--output layers.py]   compile the layer language to Python
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bitcompile", description="Low-bit networks as a torch.compile backend.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile a layer description (the layer language) to a Python module")
    comp.add_argument("source", type=Path)
    comp.add_argument("--output", "-o", type=Path, help="where to write the module (default: SOURCE with .py)")
    args = parser.parse_args(argv)

    from bitcompile.layer_dsl import LayerSyntaxError, compile_source

    try:  # the whole file is checked before anything is written
        code = compile_source(args.source.read_text(encoding="utf-8"), str(args.source))
    except (OSError, UnicodeDecodeError, LayerSyntaxError) as err:
        print(f"bitcompile compile: {err}", file=sys.stderr)
        return 1
    output = args.output or args.source.with_suffix(".py")
    if output.resolve() == args.source.resolve():
        print(f"bitcompile compile: {output} is the source; pass --output", file=sys.stderr)
        return 1
    output.write_text(code, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
