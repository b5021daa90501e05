"""`python -m sd ...`: see sd/cli.py."""
import sys

from .cli import main

sys.exit(main())
