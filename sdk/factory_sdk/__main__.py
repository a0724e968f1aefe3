"""`python -m factory_sdk`: the `factory` command, where the console script is not on PATH."""

from factory_sdk.cli import main

main()
