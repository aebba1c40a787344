"""``python -m dspy_infra.cli``: the same as the ``dspy-infra`` console script."""

import sys

from dspy_infra.cli import main

sys.exit(main())
