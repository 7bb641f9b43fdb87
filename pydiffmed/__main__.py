"""`python -m pydiffmed ...`: the same command as the `pydiffmed` console script, with the same exit status."""
import sys

from pydiffmed.cli import main

if __name__ == "__main__":
    sys.exit(main())
