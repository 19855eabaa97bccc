"""Pure computation (numpy/torch, no file I/O): statistics, upsampling, tally, ranking, metrics."""
