"""`python -m lmpipeline.serve`: the same as `rag-serve`."""

import sys

from lmpipeline.serve.cli import main

sys.exit(main())
