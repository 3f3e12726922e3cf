"""``python -m unit_scale_fx``: the ``unit-scale-fx`` command line."""

import sys

from .cli import main

sys.exit(main())
