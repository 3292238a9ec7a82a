"""`python -m data_prep.inspect`: the command in data_prep/inspect_dataset.py. A directory with
no __init__.py, so that it never stands for the standard library's `inspect`."""

import sys

from data_prep.inspect_dataset import main

sys.exit(main())
