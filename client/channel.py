"""Opening a channel from ClientOptions, sync or grpc.aio, with an interceptor that gives every unary call
the defaults a bare stub lacks: a deadline (``deadline_s`` / ``write_deadline_s``) and, over plaintext,
the bearer token. Calls that set their own timeout or authorization metadata keep them."""

from __future__ import annotations

import collections
from importlib import metadata as pkg_metadata

import grpc

from fusionrec.client.options import (ClientOptions, auth_metadata, channel_credentials,
                                      channel_options)


def user_agent() -> str:
    try:
        return f"fusionrec-client/{pkg_metadata.version('fusionrec')}"
    except pkg_metadata.PackageNotFoundError:
        return "fusionrec-client"


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _with_defaults(options: ClientOptions, details) -> tuple[float, list]:
    """(timeout, metadata) of a call with the defaults filled in."""
    timeout = details.timeout if details.timeout is not None else options.deadline_for(_method_name(details.method))
    metadata = list(details.metadata or ())
    if not any(k == "authorization" for k, _ in metadata):
        metadata.extend(auth_metadata(options))
    return timeout, metadata


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class DefaultsInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Deadline and auth defaults for sync unary calls."""

    def __init__(self, options: ClientOptions) -> None:
        self._options = options

    def intercept_unary_unary(self, continuation, client_call_details, request):
        timeout, metadata = _with_defaults(self._options, client_call_details)
        details = _CallDetails(client_call_details.method, timeout, metadata, client_call_details.credentials,
                               client_call_details.wait_for_ready,
                               getattr(client_call_details, "compression", None))
        return continuation(details, request)


class AsyncDefaultsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Deadline and auth defaults for grpc.aio unary calls."""

    def __init__(self, options: ClientOptions) -> None:
        self._options = options

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        timeout, metadata = _with_defaults(self._options, client_call_details)
        details = grpc.aio.ClientCallDetails(client_call_details.method, timeout, grpc.aio.Metadata(*metadata),
                                             client_call_details.credentials, client_call_details.wait_for_ready)
        return await continuation(details, request)


def open_channel(options: ClientOptions) -> grpc.Channel:
    """A sync channel to ``options.target`` (TLS when configured) with the defaults interceptor."""
    args = channel_options(options, user_agent())
    creds = channel_credentials(options)
    raw = grpc.secure_channel(options.target, creds, args) if creds else grpc.insecure_channel(options.target, args)
    return grpc.intercept_channel(raw, DefaultsInterceptor(options))


def open_aio_channel(options: ClientOptions) -> grpc.aio.Channel:
    """A grpc.aio channel to ``options.target`` with the same options and defaults."""
    args = channel_options(options, user_agent())
    creds = channel_credentials(options)
    interceptors = [AsyncDefaultsInterceptor(options)]
    if creds:
        return grpc.aio.secure_channel(options.target, creds, args, interceptors=interceptors)
    return grpc.aio.insecure_channel(options.target, args, interceptors=interceptors)
