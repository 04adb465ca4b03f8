"""`python -m llmtags.cli`: the `llmtags` command."""

import sys

from . import main

sys.exit(main())
