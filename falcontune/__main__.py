"""python -m falcontune ... is the falcontune command."""
from .cli import main

raise SystemExit(main())
