"""``python -m lemoe ...`` is the ``lemoe`` command (useful where the console script is not installed)."""

from lemoe.cli import main

raise SystemExit(main())
