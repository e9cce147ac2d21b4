"""Run the lut-fast CLI from a checkout: ``python cli.py train ...`` (same as the ``lut-fast`` command)."""

from lut_fast.cli import main

if __name__ == "__main__":
    main()
