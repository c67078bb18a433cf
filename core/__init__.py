"""Shared vocabulary of every layer: domain errors, data rules, paths. No Ray, no gRPC."""
