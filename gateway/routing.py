"""Which encoder deployment encodes each modality: the app's own, or around an encoder swap the incoming
one, which runs as its own Serve application (``<app>-swap-<modality>``, gateway/swap.py).

The rule: encode with the deployment whose encoder version is the store's, so that query and item
vectors always share a space. While a swap fills its shadow vectors, upserts are also encoded by the
incoming encoder (``shadow``); once the swap commits, the incoming encoder serves until the app's own
deployment runs the same version (reconfigured in place), and then the swap app goes away.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fusionrec.gateway.config import encoder_deployment_name

log = logging.getLogger("ray.serve")
INFO_TIMEOUT_S = 5.0
#: How long a refresh waits on an incoming encoder that has answered before (then its last answer holds).
KNOWN_INFO_TIMEOUT_S = 1.0


def swap_app_name(app_name: str, modality: str) -> str:
    """The Serve application an incoming ``modality`` encoder runs in during a swap."""
    return f"{app_name}-swap-{modality}"


async def _version(handle: Any, timeout_s: float = INFO_TIMEOUT_S) -> str | None:
    """The encoder version behind ``handle``, or None when it does not answer in time (absent app)."""
    try:
        info = await asyncio.wait_for(_awaited(handle.info.remote()), timeout_s)
    except Exception:  # no such app, or it is going away: route around it
        return None
    return info["version"]


async def _awaited(response: Any) -> Any:
    return await response


class EncoderRoutes:
    """The encoder handle per modality that matches the store, and the incoming ones of swaps."""

    def __init__(self, own: dict[str, Any], app_name: str = "fusionrec") -> None:
        self.own = own
        self.app_name = app_name
        self.active: dict[str, Any] = dict(own)
        self.versions: dict[str, str] = {}
        self.shadow: dict[str, Any] = {}  # modality -> incoming encoder of a swap still filling
        self._incoming: dict[str, Any] = {}
        self._answered: dict[str, str] = {}  # modality -> the version its incoming encoder last answered

    def incoming(self, modality: str) -> Any:
        """The handle of ``modality``'s swap application (kept: a new handle first waits for its routes)."""
        from ray import serve

        if modality not in self._incoming:
            self._incoming[modality] = serve.get_deployment_handle(encoder_deployment_name(modality),
                                                                   swap_app_name(self.app_name, modality))
        return self._incoming[modality]

    async def refresh(self, own: dict[str, str], stored: dict[str, str], swaps: dict[str, str]) -> None:
        """Route each modality to the deployment whose version is ``stored[m]``.

        Args:
            own: modality -> encoder version of the app's own deployment.
            stored: modality -> encoder version of the stored vectors.
            swaps: modality -> incoming version, for swaps still filling shadow vectors.
        """
        active, versions, shadow = {}, {}, {}
        for m, handle in self.own.items():
            active[m], versions[m] = handle, own[m]
            if m in swaps or own[m] != stored.get(m, own[m]):
                incoming = self.incoming(m)
                known = self._answered.get(m)
                version = await _version(incoming, KNOWN_INFO_TIMEOUT_S if known else INFO_TIMEOUT_S)
                if version is not None:
                    self._answered[m] = version
                if m in swaps and version == swaps[m]:
                    shadow[m] = incoming
                elif (version or known) == stored.get(m) != own[m]:
                    # Swapped, the app's own deployment not yet reconfigured. An incoming encoder slow to
                    # answer (busy cores, its lower priority) keeps serving: a swap app keeps its encoder.
                    active[m], versions[m] = incoming, version or known
        if versions != self.versions:
            log.info("encoders in use: %s (shadow: %s)", versions, sorted(shadow))
        self.active, self.versions, self.shadow = active, versions, shadow
