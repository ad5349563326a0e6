"""`python -m lightkv_export.report`: see lightkv_export.report.cli."""

import sys

from lightkv_export.report.cli import main

sys.exit(main())
