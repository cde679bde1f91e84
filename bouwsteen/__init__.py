"""The `bouwsteen` command line (bouwsteen/cli.py)."""
