"""Running fast in bounded memory: device and precision, the memory budget, tiling, the heap, fast paths."""
