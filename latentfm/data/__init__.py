"""Volume I/O, preprocessing, the embedded brain cohort and the grain loader."""
