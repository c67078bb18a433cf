"""The `fusionrec` command line: serve, demo, ingest, recommend, status."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import typer
from tqdm import tqdm

from fusionrec.core.paths import default_config, demo_dir, shared_path
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.cli.catalog import read_jsonl
from fusionrec.client import Client, Range, ServiceError, filter_to_pb, proto_path

app = typer.Typer(help="fusionrec: multimodal recommendation served over gRPC.", no_args_is_help=True)

TARGET = typer.Option("127.0.0.1:9000", "--target", "-t", help="host:port of the fusionrec gRPC service.")
TOKEN = typer.Option("", "--token", envvar="FUSIONREC_TOKEN", help="Auth token, if the server requires one.")
TLS = typer.Option(False, "--tls", envvar="FUSIONREC_TLS", help="Connect with TLS (system roots unless --root-certs).")
ROOT_CERTS = typer.Option(None, "--root-certs", envvar="FUSIONREC_ROOT_CERTS", exists=True, dir_okay=False,
                          help="PEM root certificates to trust (implies --tls).")
CONFIG = typer.Option(None, "--config", "-c", envvar="FUSIONREC_CONFIG", callback=lambda v: v or default_config(),
                      help="Serve config file (default: the packaged deploy/local.yaml).")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Join an existing Ray cluster (default: start a local one).")


def _start(config: Path, ray_address: Optional[str]):
    from fusionrec.gateway.runtime import start

    typer.echo(f"starting Ray Serve app from {config} (first start loads models, ~1 min) ...")
    running = start(config, ray_address)
    typer.echo(f"SERVING on {running.target} after {running.startup_s:.1f} s")
    return running


def _block_until_signal() -> None:
    from fusionrec.gateway.runtime import stop

    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    typer.echo("shutting down ...")
    stop()


@app.command()
def serve(config: Path = CONFIG, ray_address: Optional[str] = RAY_ADDRESS) -> None:
    """Deploy the Serve app and serve gRPC until Ctrl-C."""
    _start(config, ray_address)
    _block_until_signal()


@app.command()
def demo(config: Path = CONFIG, ray_address: Optional[str] = RAY_ADDRESS, items: int = 240, users: int = 200,
         media_dir: Optional[Path] = typer.Option(None, help="Sample photos the catalog is made from "
                                                    "(default: media/ under $FUSIONREC_SHARED_DIR or ../shared)."),
         exit_after_load: bool = typer.Option(False, help="Stop after loading instead of serving on.")) -> None:
    """Serve, load the deterministic sample catalog and users, train the fusion model on them (promoted
    when better than the served one on the hold-out), print how to call it, serve on."""
    from fusionrec.cli.sample_catalog import generate_catalog

    t0 = time.monotonic()
    try:
        media_dir = media_dir or shared_path("media")
    except FileNotFoundError as err:  # a setup problem, not a bug: say it without a traceback
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    with tqdm(total=items, desc="generate catalog", unit="item") as bar:
        files = generate_catalog(demo_dir(), media_dir, n_items=items, n_users=users, progress=bar.update)
    running = _start(config, ray_address)
    client = Client(running.target)
    items_stored, users_stored = _demo_loaded(client, files)
    if not items_stored:
        _ingest(files.catalog_path, running.target, "", batch_size=32)
    if not users_stored:
        typer.echo(f"recorded {_record(files.interactions_path, running.target, '')} sample interactions")
    if items_stored and users_stored:
        typer.echo("sample catalog already loaded")
    demo_training(config, ray_address or "auto")
    reply = client.stub.Recommend(pb.RecommendRequest(user_id="user-001", k=5), timeout=30)
    first_answer_s = time.monotonic() - t0
    typer.echo(f"\nfirst Recommend answered {first_answer_s:.1f} s after start "
               f"({len(reply.items)} items for user-001: {', '.join(i.item_id for i in reply.items)})")
    typer.echo(f"""
fusionrec is serving the sample catalog on {running.target}. Try:
  .venv/bin/fusionrec recommend --user user-001 -k 5
  .venv/bin/fusionrec recommend --user user-002 --text "a calm photo of a cat" -k 5
  .venv/bin/fusionrec recommend --image {demo_dir()}/media/item-0001.jpg -k 5 --filter mood=calm
  .venv/bin/fusionrec status
  grpcurl -plaintext -d '{{"user_id": "user-001", "k": 5}}' {running.target} fusionrec.v1.Recommender/Recommend
Ctrl-C stops it.""")
    if not exit_after_load:
        _block_until_signal()


def _demo_loaded(client: Client, files) -> tuple[bool, bool]:
    """(items stored, interactions recorded) for the sample catalog. It is deterministic: when its first
    item is stored, all items are; when its last user has a history, all interactions are."""
    first_id = next(read_jsonl(files.catalog_path))["id"]
    last_user = list(read_jsonl(files.interactions_path))[-1]["user_id"]
    try:
        client.stub.GetItem(pb.GetItemRequest(item_id=first_id), timeout=10)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False, False
    reply = client.stub.Recommend(pb.RecommendRequest(user_id=last_user, k=1), timeout=30)
    return True, "history" in reply.modalities_used


def _client(target: str, token: str, tls: bool = False, root_certs: Optional[Path] = None) -> Client:
    return Client(target, token, tls=tls, root_certs_path=root_certs)


def _ingest(catalog: Path, target: str, token: str, batch_size: int) -> int:
    """Upsert a catalog (the demo's loader; `ingest` reports more). Returns the items upserted."""
    from fusionrec.cli.ingest import load_catalog

    with tqdm(desc="ingest", unit="item", disable=None) as bar:
        report = load_catalog(_client(target, token), catalog, batch_size=batch_size, progress_factory=_sized(bar))
    return report.upserted


def _record(interactions: Path, target: str, token: str, batch_size: int = 1000) -> int:
    """Record every event (the demo's loader: it checked the store itself, so no progress file)."""
    from fusionrec.cli.ingest import record_file

    return record_file(_client(target, token), interactions, batch_size=batch_size, resume=False).recorded


def _sized(bar: tqdm):
    """A progress_factory for fusionrec.cli.ingest over a tqdm bar (on stderr; hidden when not a terminal)."""
    def factory(total: int):
        bar.total = total
        bar.refresh()
        return bar.update
    return factory


#: Bad rows printed one a line; beyond this only their count.
MAX_BAD_ROWS_SHOWN = 20


def _echo_bad(report) -> None:
    for err in report.bad[:MAX_BAD_ROWS_SHOWN]:
        typer.echo(str(err), err=True)
    if len(report.bad) > MAX_BAD_ROWS_SHOWN:
        typer.echo(f"... and {len(report.bad) - MAX_BAD_ROWS_SHOWN} more bad rows", err=True)


@app.command()
def ingest(catalog: Path = typer.Argument(..., exists=True, dir_okay=False,
                                          help="JSONL catalog: id, attributes, text, image, audio, vectors."),
           interactions: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                                       help="JSONL interactions to record after the items."),
           target: str = TARGET, token: str = TOKEN, tls: bool = TLS, root_certs: Optional[Path] = ROOT_CERTS,
           batch_size: int = typer.Option(32, min=1, max=256, help="Items per UpsertItems call."),
           skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad rows (each reported, then counted) "
                                         "and exit 0; default: stop before sending anything and exit 1."),
           resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip items already stored (GetItem) "
                                       "and interactions a previous run recorded; --no-resume sends every row.")) -> None:
    """Load a JSONL catalog through the service: rows checked first, batched upserts, safe to rerun."""
    from fusionrec.cli.ingest import IngestStopped, load_catalog, record_file

    client = _client(target, token, tls, root_certs)
    try:
        with tqdm(desc="ingest", unit="item", disable=None) as bar:
            report = load_catalog(client, catalog, batch_size=batch_size, skip_bad=skip_bad, resume=resume,
                                  progress_factory=_sized(bar))
        if interactions:
            record_file(client, interactions, skip_bad=skip_bad, resume=resume, report=report)
    except IngestStopped as stop:
        _echo_bad(stop.report)
        done = ("nothing was sent" if stop.before_sending and not stop.report.upserted
                else f"{stop.report.upserted} items upserted before it; a rerun resumes")
        typer.echo(f"ingest stopped: {len(stop.report.bad)} bad rows; {done}. Fix them, or rerun with --skip-bad "
                   "to load the rest.", err=True)
        raise typer.Exit(1)
    except ServiceError as err:
        raise typer.Exit(_report(err))
    finally:
        client.close()
    _echo_bad(report)
    typer.echo(f"upserted {report.upserted} items; {report.already_stored} already stored; "
               f"{len(report.bad)} bad rows skipped")
    if interactions:
        typer.echo(f"recorded {report.recorded} interactions; {report.already_recorded} already recorded")


def _report(err: ServiceError) -> int:
    typer.echo(f"error: {err}", err=True)
    return 1


def _scalar(text: str):
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _parse_filter(spec: str) -> pb.Filter:
    """attr=value | attr=a|b|c (set) | attr>=x | attr<=x | attr=lo..hi (range)."""
    try:
        for op in (">=", "<="):
            if op in spec:
                name, value = spec.split(op, 1)
                bound = Range(min=float(value)) if op == ">=" else Range(max=float(value))
                return filter_to_pb(name, bound)
        name, sep, value = spec.partition("=")
        if not sep:
            raise ValueError("no operator")
        if ".." in value:
            lo, hi = value.split("..", 1)
            return filter_to_pb(name, (float(lo), float(hi)))
        values = [_scalar(v) for v in value.split("|")]
        return filter_to_pb(name, set(values) if len(values) > 1 else values[0])
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(f"filter {spec!r}: {err}; use attr=value, attr=a|b, attr>=x, attr<=x or "
                                 "attr=lo..hi") from None


@app.command()
def recommend(user: str = typer.Option("", "--user", "-u"), k: int = typer.Option(10, "-k"),
              text: str = typer.Option("", help="Query text."),
              image: Optional[Path] = typer.Option(None, exists=True, help="Query image file."),
              audio: Optional[Path] = typer.Option(None, exists=True, help="Query audio file."),
              history: list[str] = typer.Option([], help="History item ids (instead of the stored history)."),
              filter: list[str] = typer.Option([], "--filter", "-f", help="attr=value, attr=a|b, attr>=x, attr<=x, attr=lo..hi"),
              exclude: list[str] = typer.Option([], help="Item ids to leave out."),
              deadline_ms: int = typer.Option(5000), timings: bool = typer.Option(False, help="Show per-stage timings."),
              as_json: bool = typer.Option(False, "--json"), target: str = TARGET, token: str = TOKEN,
              tls: bool = TLS, root_certs: Optional[Path] = ROOT_CERTS) -> None:
    """Call Recommend and print the ranked items."""
    filters = [_parse_filter(f) for f in filter]
    with _client(target, token, tls, root_certs) as client:
        try:
            reply = client.recommend(user, k=k, text=text, image=image, audio=audio, history=history,
                                     filters=filters, exclude=exclude, timings=timings,
                                     timeout_s=deadline_ms / 1000)
        except ServiceError as err:
            raise typer.Exit(_report(err))
    if as_json:
        from google.protobuf.json_format import MessageToDict
        typer.echo(json.dumps(MessageToDict(reply), indent=2))
        return
    typer.echo(f"request {reply.request_id}  model {reply.model_version}  used {list(reply.modalities_used)}"
               + (f"  DEGRADED {[(d.modality, d.reason) for d in reply.modalities_dropped]}" if reply.degraded else ""))
    for rank, item in enumerate(reply.items, 1):
        parts = " ".join(f"{c.modality}={c.score:+.3f}" for c in item.contributions)
        attrs = {k: getattr(v, v.WhichOneof("kind")) for k, v in item.attributes.items()}
        typer.echo(f"{rank:3d}. {item.item_id:<16} {item.score:.4f}  [{parts}]  {attrs}")
    for t in reply.timings:
        typer.echo(f"  {t.stage:<22} {t.duration_ms:8.2f} ms")


@app.command()
def status(target: str = TARGET, token: str = TOKEN, tls: bool = TLS, root_certs: Optional[Path] = ROOT_CERTS,
           ray_address: str = typer.Option("auto", "--ray-address"), app_name: str = "fusionrec") -> None:
    """Health, deployments, replicas and item count; exits 0 only while health is SERVING."""
    with _client(target, token, tls, root_certs) as client:
        serving = client.serving()
    typer.echo(f"health {target}: {'SERVING' if serving else 'NOT SERVING'}")
    try:
        _print_deployments(ray_address, app_name)
    except Exception as err:  # the cluster may be unreachable from here; health still decides
        typer.echo(f"deployments: unavailable ({type(err).__name__}: {err})")
    raise typer.Exit(0 if serving else 1)


@app.command("proto-path")
def proto_path_command(include_root: bool = typer.Option(False, "--include-root",
                                                         help="Print the folder to pass to protoc -I instead.")) -> None:
    """Where the installed recommender.proto is, to generate clients in other languages:
    protoc -I "$(fusionrec proto-path --include-root)" ... fusionrec/v1/recommender.proto"""
    path = proto_path()
    typer.echo(path.parents[2] if include_root else path)


@app.command()
def reload(config: Path = CONFIG, ray_address: str = typer.Option("auto", "--ray-address")) -> None:
    """Apply an edited config to the running app; a new fusion model loads without a restart."""
    from fusionrec.gateway.runtime import redeploy

    typer.echo(f"applied {config} to application {redeploy(config, ray_address)}; "
               "run `fusionrec reindex` if the fusion model changed")


@app.command()
def reindex(app_name: str = "fusionrec", model_version: Optional[str] = typer.Option(None, help="Default: newest loaded."),
            ray_address: str = typer.Option("auto", "--ray-address")) -> None:
    """Recompute every stored fused vector with the new fusion model from the stored modality vectors."""
    from fusionrec.gateway.runtime import reindex as run_reindex

    result = run_reindex(app_name, model_version, ray_address)
    if result["changed"]:
        typer.echo(f"re-indexed {result['items']} items with {result['model_version']}")
    else:
        typer.echo(f"store already indexed with {result['model_version']}")


def _name(enum_or_str) -> str:
    return str(getattr(enum_or_str, "value", enum_or_str))


def _print_deployments(ray_address: str, app_name: str) -> None:
    from ray import serve

    from fusionrec.gateway.runtime import call_handle, connect

    connect(ray_address)
    app_status = serve.status().applications[app_name]
    typer.echo(f"application {app_name}: {_name(app_status.status)}")
    for name, dep in app_status.deployments.items():
        replicas = ", ".join(f"{n} {_name(state)}" for state, n in dep.replica_states.items())
        typer.echo(f"  {name:<14} {_name(dep.status):<12} replicas: {replicas}")
    count = call_handle(serve.get_deployment_handle("Retrieval", app_name), "count", timeout_s=30)
    typer.echo(f"items stored: {count}")


from fusionrec.cli.bench import bench_app  # noqa: E402  (commands register on import)
from fusionrec.cli.encoders import encoders_app  # noqa: E402
from fusionrec.cli.deploy import deploy_app  # noqa: E402
from fusionrec.cli.quality import demo_training, evaluate, train  # noqa: E402
from fusionrec.cli.ranking_eval import eval_ranking  # noqa: E402

app.add_typer(bench_app, name="bench")
app.add_typer(encoders_app, name="encoders")
app.add_typer(deploy_app, name="deploy")
app.command()(train)
app.command()(evaluate)
app.command(name="eval-ranking")(eval_ranking)


if __name__ == "__main__":
    app()
