"""Clear the notebooks' outputs, execution counts and saved widget state before committing.

    python notebooks/strip_outputs.py            # every notebook in this folder, in place
    python notebooks/strip_outputs.py --check    # exit 1 listing the notebooks that hold outputs

`jupyter nbconvert --clear-output` leaves the saved widget state in the notebook metadata; this
removes it too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
OUTPUT_METADATA = ("collapsed", "scrolled", "execution")


def strip(nb) -> bool:
    """Clear `nb` in place; True if anything was removed."""
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
        for field in OUTPUT_METADATA:
            changed |= cell.metadata.pop(field, None) is not None
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: all in notebooks/)")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if any holds outputs")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.paths or sorted(HERE.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'holds outputs' if args.check else 'cleared'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
