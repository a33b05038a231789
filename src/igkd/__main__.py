"""``python -m igkd``: the same command line as ``igkd``."""

from .cli import main

if __name__ == "__main__":
    main()
