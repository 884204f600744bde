"""``python -m ctr``: the same command line as ``ctr``."""

from ctr.cli import main

main()
