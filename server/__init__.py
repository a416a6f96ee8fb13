"""Server side: run phases, quality scoring and export, from DP outputs only."""
