"""`python -m chatq` is the `chatq` command."""

from chatq.cli import main

main()
