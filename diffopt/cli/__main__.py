"""``python -m diffopt.cli``: the ``diffopt`` command."""

import sys

from diffopt.cli import main

main(sys.argv[1:])
