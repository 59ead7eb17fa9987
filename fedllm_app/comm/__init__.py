"""Communication: the codecs of the arrays that travel (both directions) and the run's byte budget."""
