"""`python -m sd ...`: see sd/cli/."""
import sys

from .cli import main

sys.exit(main())
