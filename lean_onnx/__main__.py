"""`python -m lean_onnx ...` is the `lean-onnx` command."""

import sys

from .cli import main

sys.exit(main())
