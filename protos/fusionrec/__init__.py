"""fusionrec: gRPC serving for multimodal recommendation.

One namespace over the repository's folders (pyproject.toml maps them): fusionrec.v1 (generated gRPC
code, protos/), fusionrec.core, .encoders, .fusion, .retrieval, .gateway, .cli, .bench, .deploy.
"""
