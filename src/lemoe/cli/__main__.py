"""``python -m lemoe.cli ...`` is the ``lemoe`` command."""

import sys

from lemoe.cli import main

sys.exit(main())
