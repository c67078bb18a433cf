"""The `fusionrec` command: serving, catalog loading, training and benchmarks, plus the Python client."""
