"""Waiting on many gRPC call futures at once, for the tests that fire a burst and count the answers."""

from __future__ import annotations

from typing import Iterable

import grpc


def settle(futures: Iterable[grpc.Future]) -> tuple[int, list[grpc.RpcError]]:
    """Wait for every call: (how many succeeded, the errors of the others, in call order)."""
    ok, errors = 0, []
    for f in futures:
        try:
            f.result()
            ok += 1
        except grpc.RpcError as err:
            errors.append(err)
    return ok, errors
