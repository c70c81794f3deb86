"""Join trained classifier checkpoints into one: the CFC-SP cascade, weighted ensembles."""
