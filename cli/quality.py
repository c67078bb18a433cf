"""`fusionrec train` / `fusionrec evaluate`: thin Typer wrappers around fusionrec.fusion.train.training and fusionrec.fusion.train.quality."""

from __future__ import annotations

import json
from pathlib import Path

import typer

quality_app = typer.Typer(help="Offline training and evaluation of the fusion model.", no_args_is_help=True)


@quality_app.command()
def train(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
          variant: str = typer.Option("full", help="Variant name (fusionrec.fusion.train.config.VARIANTS)."),
          seed: int = typer.Option(0, help="Random seed (an ensemble's nets train under seeds derived from it)."),
          members: int = typer.Option(0, help="Nets in the served ensemble (0 = the variant's default)."),
          epochs: int = typer.Option(200, help="Max epochs (early stopping on valid Recall@20 usually ends sooner)."),
          patience: int = typer.Option(10, help="Epochs without a better valid Recall@20 before stopping."),
          workers: int = typer.Option(2, help="Nets trained in parallel (one torch thread each; 1 = all cores)."),
          checkpoint_dir: Path = typer.Option(None, help="Where checkpoints go (default .fusionrec/checkpoints).")
          ) -> None:
    """Train one variant (every net of its ensemble), keep each net's best-on-valid epoch, write a versioned
    checkpoint + metrics json."""
    from fusionrec.fusion.train.config import get_variant
    from fusionrec.fusion.train.data import load_dataset
    from fusionrec.fusion.train.quality import ensemble_run, member_specs, run_jobs

    spec = get_variant(variant)
    data = load_dataset(dataset)  # builds the text cache once, before workers start
    config = {"epochs": epochs, "patience": patience}
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


@quality_app.command()
def evaluate(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
             seeds: int = typer.Option(3, help="Seeds for the full model (mean ± std)."),
             ablation_seeds: int = typer.Option(1, help="Seeds per ablation variant."),
             workers: int = typer.Option(2, help="Training runs in parallel (one torch thread each)."),
             cold: bool = typer.Option(True, help="Also run the cold-item split."),
             members: int = typer.Option(0, help="Nets in the full model's ensemble (0 = the variant's default)."),
             out_dir: Path = typer.Option(None, help="Report folder (default reports/quality).")) -> None:
    """Full protocol: full model over seeds, ablations, LightGCN, cold items -> <dataset>.{json,md,png}."""
    from fusionrec.core.paths import reports_dir
    from fusionrec.fusion.train.quality import evaluate_dataset

    out = out_dir or reports_dir()
    report = evaluate_dataset(dataset, seeds=tuple(range(seeds)), ablation_seeds=tuple(range(ablation_seeds)),
                              workers=workers, cold=cold, out_dir=out,
                              members=members or None)
    t = report["test"]
    typer.echo(f"{dataset} test Recall@20 {t['recall@20']:.4f} ± {t['std']['recall@20']:.4f}, "
               f"NDCG@20 {t['ndcg@20']:.4f} ± {t['std']['ndcg@20']:.4f} ({report['wall_s']} s)")
    typer.echo(f"report: {out / (dataset + '.md')}")


if __name__ == "__main__":  # `python -m fusionrec.cli.quality evaluate` until it is mounted in fusionrec.cli.main
    quality_app()
