"""`fusionrec train` / `fusionrec evaluate`: thin Typer wrappers around fusionrec.fusion.train.training and fusionrec.fusion.train.quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from fusionrec.core.paths import default_config

quality_app = typer.Typer(help="Offline training and evaluation of the fusion model.", no_args_is_help=True)
STORE_CONFIG = typer.Option(None, "--config", "-c", envvar="FUSIONREC_CONFIG", callback=lambda v: v or default_config(),
                            help="--from-store: the running app's Serve config (default: the packaged deploy/local.yaml).")


@quality_app.command()
def train(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
          variant: Optional[str] = typer.Option(None, help="Variant name (fusionrec.fusion.train.config.VARIANTS; "
                                                "default full, with --from-store content)."),
          seed: int = typer.Option(0, help="Random seed (an ensemble's nets train under seeds derived from it)."),
          members: int = typer.Option(0, help="Nets in the served ensemble (0 = the variant's default)."),
          epochs: Optional[int] = typer.Option(None, help="Max epochs (default 200, with --from-store 60; early "
                                               "stopping on valid Recall@20 usually ends sooner)."),
          patience: Optional[int] = typer.Option(None, help="Epochs without a better valid Recall@20 before stopping "
                                                 "(default 10, with --from-store 15)."),
          workers: int = typer.Option(2, help="Nets trained in parallel (one torch thread each; 1 = all cores)."),
          checkpoint_dir: Path = typer.Option(None, help="Where checkpoints go (default .fusionrec/checkpoints)."),
          from_store: bool = typer.Option(False, "--from-store", help="Train on the running service's stored vectors "
                                          "and interactions; promote the model if it beats the served one."),
          force: bool = typer.Option(False, help="--from-store: promote even when not better on the hold-out."),
          dry_run: bool = typer.Option(False, help="--from-store: train and compare, never promote."),
          config: Path = STORE_CONFIG, ray_address: str = typer.Option("auto", "--ray-address")) -> None:
    """Train one variant (every net of its ensemble), keep each net's best-on-valid epoch, write a versioned
    checkpoint + metrics json. With --from-store: on the service's own data, compared with the served model."""
    from fusionrec.fusion.train.config import get_variant
    from fusionrec.fusion.train.data import load_dataset
    from fusionrec.fusion.train.quality import ensemble_run, member_specs, run_jobs

    if from_store:
        options = {k: v for k, v in (("epochs", epochs), ("patience", patience)) if v is not None}
        if variant:
            options["variant"] = variant
        train_from_store(config, ray_address, force=force, dry_run=dry_run, seed=seed, members=members or 1,
                         checkpoint_dir=checkpoint_dir, **options)
        return
    variant = variant or "full"
    spec = get_variant(variant)
    data = load_dataset(dataset)  # builds the text cache once, before workers start
    config = {"epochs": epochs or 200, "patience": patience or 10}
    n = members or spec.members
    runs = run_jobs([{**s, "progress": workers <= 1} for s in member_specs(dataset, variant, seed, n, config)],
                    workers)
    for r in runs:
        typer.echo(f"net {r['member']} (seed {r['train_seed']}): best epoch {r['best_epoch']}, valid Recall@20 "
                   f"{r['valid']['recall@20']:.4f}, test Recall@20 {r['test']['recall@20']:.4f} ({r['train_s']:.0f} s)")
    if spec.kind != "fusion":
        typer.echo(f"{variant} is an offline baseline (per-user embeddings): no servable checkpoint written")
        return
    run = ensemble_run(data, variant, seed, n, config, runs, export=True, checkpoint_dir=checkpoint_dir)
    typer.echo(f"{variant} ({n} nets): valid Recall@20 {run['valid']['recall@20']:.4f}; test Recall@20 "
               f"{run['test']['recall@20']:.4f} NDCG@20 {run['test']['ndcg@20']:.4f}")
    typer.echo(f"checkpoint {run['checkpoint']}")


def train_from_store(config: Path, ray_address: str = "auto", *, overrides: dict[str, Any] | None = None,
                     force: bool = False, dry_run: bool = False, min_gain: float = 0.0, app_name: str = "fusionrec",
                     echo: Callable[[str], None] = typer.echo, **options: Any) -> dict[str, Any]:
    """Train on the running service's store, compare with the served model on the hold-out, promote when better.

    Promotion (unless ``dry_run``; regardless of the comparison with ``force``): the Fusion ``user_config``
    becomes the candidate's checkpoint (``redeploy`` of ``config`` + ``overrides``: only Fusion reloads,
    in place), then the store is re-indexed with it. Writes ``<checkpoint>.report.json``.

    Args:
        overrides: what the running app was deployed with on top of ``config`` (runtime.render_config).
        options: ``train_from_snapshot`` options (variant, seed, members, checkpoint_dir, epochs, ...).
    Returns:
        the report (fusionrec.fusion.train.from_store), with ``promoted`` and ``report`` (its path).
    """
    from ray import serve

    from fusionrec.fusion.train.from_store import comparison_table, train_from_snapshot, write_report
    from fusionrec.gateway.runtime import call_handle, connect, redeploy, reindex

    connect(ray_address)
    snapshot = call_handle(serve.get_deployment_handle("Retrieval", app_name), "training_snapshot", timeout_s=600)
    served = call_handle(serve.get_deployment_handle("Fusion", app_name), "model", snapshot["model_version"],
                         timeout_s=120)
    report = train_from_snapshot(snapshot, served, min_gain=min_gain, echo=echo, **options)
    echo(comparison_table(report))
    candidate = report["candidate"]["model_version"]
    if dry_run:
        report["decision"] = "dry run: not promoted"
    elif report["better"] or force:
        fusion = {"name": "trained", "options": {"checkpoint": report["checkpoint"]}}
        redeploy(config, ray_address, overrides={**(overrides or {}), "fusion": fusion})
        report["reindexed_items"] = reindex(app_name, candidate, ray_address)["items"]
        report["promoted"] = True
        report["decision"] = f"promoted {candidate}" + ("" if report["better"] else " (forced)")
    else:
        report["decision"] = (f"not promoted: {report['compare_metric']} not above the served model's"
                              + (f" + {min_gain}" if min_gain else "") + f"; still serving {served.version}")
    report["report"] = str(write_report(report))
    echo(f"{report['decision']}\nreport: {report['report']}")
    return report


def demo_training(config: Path, ray_address: str = "auto", echo: Callable[[str], None] = typer.echo
                  ) -> dict[str, Any] | None:
    """`fusionrec demo`: train on the sample interactions and promote when better; say what serves.

    Returns the report, or None when training failed (the served model, weighted-v0, stays).
    """
    import time

    t0 = time.monotonic()
    echo("training the fusion model on the stored catalog and interactions (train --from-store) ...")
    try:
        report = train_from_store(config, ray_address, echo=echo)
    except Exception as err:  # the demo serves on with the untrained model
        echo(f"training from the store failed ({type(err).__name__}: {err}); serving the untrained model")
        return None
    served = report["served"]["model_version"] if report["served"] else "none"
    figures = (f"hold-out Recall@20 / NDCG@20: trained {report['candidate']['recall@20']:.4f} / "
               f"{report['candidate']['ndcg@20']:.4f}, {served} {report['served']['recall@20']:.4f} / "
               f"{report['served']['ndcg@20']:.4f}" if report["served"] else "")
    if report["promoted"]:
        echo(f"serving the trained model {report['candidate']['model_version']} "
             f"({time.monotonic() - t0:.1f} s; {figures})")
    else:
        echo(f"the trained model is not better on the hold-out: serving {served} ({figures})")
    return report


@quality_app.command()
def evaluate(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
             seeds: int = typer.Option(3, help="Seeds for the full model (mean ± std)."),
             ablation_seeds: int = typer.Option(3, help="Seeds per ablation, tower variant and LightGCN."),
             workers: int = typer.Option(2, help="Training runs in parallel (one torch thread each)."),
             cold: bool = typer.Option(True, help="Also run the cold-item split."),
             members: int = typer.Option(0, help="Nets in the full model's ensemble (0 = the variant's default)."),
             out_dir: Path = typer.Option(None, help="Report folder (default reports/quality)."),
             set_: list[str] = typer.Option([], "--set", help="TrainConfig override for every run, KEY=VALUE "
                                            "(JSON value), repeatable; e.g. --set user_tower=gru --set prefix_share=0.5."),
             resume: bool = typer.Option(True, help="Reuse training jobs an interrupted run finished (kept under "
                                         "$FUSIONREC_HOME/cache/quality-jobs, keyed by spec and training code).")
             ) -> None:
    """Full protocol: full model over seeds, ablations, LightGCN, cold items -> <dataset>.{json,md,png}."""
    from fusionrec.core.paths import reports_dir
    from fusionrec.fusion.train.quality import evaluate_dataset

    out = out_dir or reports_dir()
    report = evaluate_dataset(dataset, seeds=tuple(range(seeds)), ablation_seeds=tuple(range(ablation_seeds)),
                              workers=workers, cold=cold, out_dir=out,
                              members=members or None, resume=resume, config=_overrides(set_))
    t = report["test"]
    typer.echo(f"{dataset} test Recall@20 {t['recall@20']:.4f} ± {t['std']['recall@20']:.4f}, "
               f"NDCG@20 {t['ndcg@20']:.4f} ± {t['std']['ndcg@20']:.4f} ({report['wall_s']} s)")
    typer.echo(f"report: {out / (dataset + '.md')}")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> TrainConfig overrides (VALUE parsed as JSON, else kept as a string)."""
    from fusionrec.fusion.train.config import TrainConfig

    known = set(TrainConfig.__dataclass_fields__)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise typer.BadParameter(f"{pair!r}: expected KEY=VALUE with KEY one of {sorted(known)}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


if __name__ == "__main__":  # `python -m fusionrec.cli.quality evaluate` until it is mounted in fusionrec.cli.main
    quality_app()
