"""Small shared helpers: atomic I/O, training state, image grids."""
