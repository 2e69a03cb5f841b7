"""The reproduce pipeline's parts; scripts/reproduce.py is its entry point."""
