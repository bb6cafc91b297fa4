"""``python -m training [train options]`` or ``python -m training whiten ...`` (also under torchrun)."""

import sys

from dtop_export.cli import main

args = sys.argv[1:]
main(args if args[:1] in (["train"], ["whiten"]) else ["train", *args])
