"""`python -m cloud.cli`: the `prunefleet` command, as processes started by the local fleet run it."""

import sys

from cloud.cli.main import main

sys.exit(main())
