"""python -m linear_fairseq: print the package folder, the value for --user-dir.

  fairseq-train ... --user-dir "$(python -m linear_fairseq)"
"""
from pathlib import Path

print(Path(__file__).resolve().parent)
