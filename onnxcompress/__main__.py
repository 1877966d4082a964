"""`python -m onnxcompress` runs the command line."""

from onnxcompress.cli import main

main()
