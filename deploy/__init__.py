"""Ray Serve configs shipped with the package (local.yaml, gpu.yaml), read through importlib.resources,
and the deploy kit's generator: configs derived from them (variants.py), the KubeRay manifest
(rayservice.py), the committed generated files and their check (generate.py)."""
