"""`python -m service ...` is the `segserve` command."""

import sys

from service.cli import main

sys.exit(main())
