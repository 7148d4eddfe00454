"""`python -m babyllama ...` is the same as the `babyllama` console script."""

from babyllama.cli import main

raise SystemExit(main())
