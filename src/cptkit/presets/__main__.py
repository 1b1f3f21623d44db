"""`python -m cptkit.presets [NAME]`: list the shipped presets, or print one's path."""

import sys

from cptkit import presets

if len(sys.argv) > 1:
    print(presets.path(sys.argv[1]))
else:
    print("\n".join(presets.names()))
    accelerate = presets.folder() / "accelerate"
    for launch in sorted([*accelerate.glob("*.yaml"), *accelerate.glob("*.json")]):
        print(f"accelerate/{launch.name}")
