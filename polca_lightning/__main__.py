"""``python -m polca_lightning``: the ``polca`` command."""

import sys

from polca_lightning.cli import main

sys.exit(main())
