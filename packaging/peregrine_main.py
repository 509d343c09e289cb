"""The bundle's entry point: the same `peregrine` command as a source install (app/cli.py)."""

from app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
