"""`python -m ssl_blood` is the `ssl-blood` command."""

from ssl_blood.cli import main

raise SystemExit(main())
