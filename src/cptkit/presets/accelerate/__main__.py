"""`python -m cptkit.presets.accelerate [NAME]`: print a preset's path, or list them all."""

import sys

from cptkit.presets.accelerate import PRESETS, path

if len(sys.argv) > 1:
    sys.stdout.write(f"{path(sys.argv[1])}\n")
else:
    for name, what in PRESETS.items():
        sys.stdout.write(f"{name:6} {path(name)}\n       {what}\n")
