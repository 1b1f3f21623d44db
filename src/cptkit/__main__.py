"""`python -m cptkit ...` and `accelerate launch -m cptkit train ...`."""

from cptkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
