"""`python -m caramba.cli`: the `caramba` command."""
import sys

from caramba.cli import main

sys.exit(main())
