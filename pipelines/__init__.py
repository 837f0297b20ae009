"""Thin command layer: parse arguments, call tfkarpa, print a summary. See __main__.py."""
