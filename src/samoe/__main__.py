"""`python -m samoe ...`, as torchrun launches it: `torchrun --nproc_per_node 2 -m samoe train ...`."""

import sys

from samoe.cli import main

sys.exit(main())
