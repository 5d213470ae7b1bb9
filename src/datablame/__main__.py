"""`python -m datablame` runs the command line."""

from datablame.cli.main import main

main()
