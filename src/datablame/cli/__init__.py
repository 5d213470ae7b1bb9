"""The `datablame` command line (main.py: index, trace, demo; tabular.py: tabular, verify)."""
