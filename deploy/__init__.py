"""Ray Serve configs shipped with the package (local.yaml, gpu.yaml), read through importlib.resources."""
