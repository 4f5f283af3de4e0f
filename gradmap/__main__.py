"""``python -m gradmap`` is the ``gradmap`` command."""

import sys

from .cli import main

sys.exit(main())
