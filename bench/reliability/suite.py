"""`fusionrec bench reliability` / `make reliability`: start the service as its own process tree (a token
required), then the hostile-input suite, the faults, the overload and the soak, in that order, and
write reports/reliability.{json,md,png}."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fusionrec.bench.reliability import hostile, processes, report
from fusionrec.bench.reliability.faults import run_faults
from fusionrec.bench.reliability.overload import run_overload
from fusionrec.bench.reliability.service import ServiceProcess
from fusionrec.bench.reliability.soak import run_soak

Log = Callable[[str], None]
TOKEN = "reliability-token"  # the service under test requires it: the suite checks refusals without it
USERS = [f"rel-user-{i}" for i in range(8)]  # the users the fault traffic records interactions for


@dataclass
class ReliabilityPlan:
    hostile: bool = True
    kill: tuple[str, ...] = processes.DEPLOYMENTS  # one replica of each, in turn; () skips them
    whole_tree: bool = True
    overload_s: float = 20.0  # 0 skips the overload
    overload_deadline_ms: float = 1000.0  # every overload call's deadline (admission sheds against it)
    soak_s: float = 600.0  # 0 skips the soak
    soak_warmup_s: float = 60.0


def run_reliability(config: Path, out_dir: Path, plan: ReliabilityPlan, log: Log = print,
                    env: dict[str, str] | None = None) -> dict[str, Any]:
    """Every section the plan asks for against a fresh service on a fresh store; returns the report."""
    rep: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": str(config),
                           "note": "2-core machine shared with other work: timings include its noise"}
    with tempfile.TemporaryDirectory(prefix="fusionrec-reliability-") as tmp:
        service = ServiceProcess(config, Path(tmp), token=TOKEN, env=env)
        try:
            rep["startup_s"] = service.start()
            log(f"service SERVING on {service.target} after {rep['startup_s']:.0f} s")
            with hostile.open_channel(service.target) as channel:
                versions = hostile.seed_base(channel, TOKEN)
            dim = hostile.DEFAULT_DIMS["text"]
            sections: list[tuple[str, bool, Callable[[], dict]]] = [
                ("hostile", plan.hostile, lambda: hostile.run_hostile(service.target, TOKEN, log=log)),
                ("faults", bool(plan.kill) or plan.whole_tree,
                 lambda: run_faults(service, versions, dim, plan.kill, plan.whole_tree, log=log)),
                ("overload", plan.overload_s > 0, lambda: run_overload(
                    service.target, TOKEN, USERS, overload_s=plan.overload_s,
                    timeout_s=plan.overload_deadline_ms / 1000, root_pid=service.pid, log=log)),
                ("soak", plan.soak_s > 0, lambda: run_soak(service.target, TOKEN, service.pid, versions, dim,
                                                          plan.soak_s, plan.soak_warmup_s, log=log)),
            ]
            for name, wanted, run in sections:
                if wanted:
                    log(f"{name} ...")
                    rep[name] = _section(name, run, log)
        finally:
            service.stop()
    report.write(rep, out_dir)
    return rep


def _section(name: str, run: Callable[[], dict], log: Log) -> dict:
    """One section's result; a failure of the harness itself is recorded, so the other sections still report."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - the report names it
        log(f"  {name} could not run: {exc!r}")
        return {"error": repr(exc)}
