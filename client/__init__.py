"""Client side: the only package that reads a hospital's patient files."""
