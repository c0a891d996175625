"""``python -m era_server [--host H] [--port P]``."""

from . import main

raise SystemExit(main())
