"""`python -m passthru`: the same command line as `passthru`."""

from passthru.cli import main

raise SystemExit(main())
