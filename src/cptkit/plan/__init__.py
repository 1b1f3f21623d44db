"""`cptkit plan`: what a config will do before anything loads: tokens per source and in the mix, the
optimizer steps, the memory plan on a named GPU and the one present, the predicted speed and wall time
from measured calibration rows, and the warnings worth reading before a GPU is rented."""
