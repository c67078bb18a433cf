"""`fusionrec train` / `fusionrec evaluate`: thin Typer wrappers around fusion.training and fusion.quality."""

from __future__ import annotations

import json
from pathlib import Path

import typer

quality_app = typer.Typer(help="Offline training and evaluation of the fusion model.", no_args_is_help=True)


@quality_app.command()
def train(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
          variant: str = typer.Option("full", help="Variant name (fusion.variants.VARIANTS)."),
          seed: int = typer.Option(0, help="Random seed."),
          epochs: int = typer.Option(200, help="Max epochs (early stopping on valid Recall@20 usually ends sooner)."),
          patience: int = typer.Option(10, help="Epochs without a better valid Recall@20 before stopping."),
          threads: int = typer.Option(0, help="torch threads (0 = all cores)."),
          checkpoint_dir: Path = typer.Option(None, help="Where checkpoints go (default .fusionrec/checkpoints).")
          ) -> None:
    """Train one variant, keep the best-on-valid epoch, write a versioned checkpoint + metrics json."""
    import torch

    from fusion.checkpoint import DEFAULT_CHECKPOINT_DIR, export_payload, save_checkpoint
    from fusion.data import load_dataset
    from fusion.training import train as run_train
    from fusion.variants import get_variant, train_config

    if threads:
        torch.set_num_threads(threads)
    spec = get_variant(variant)
    data = load_dataset(dataset)
    cfg = train_config(spec, epochs=epochs, patience=patience)
    result = run_train(data, spec, cfg, seed=seed, progress=True, desc=f"{dataset}/{variant}")
    metrics = {"valid": result.valid, "test": result.test, "best_epoch": result.best_epoch}
    typer.echo(f"best epoch {result.best_epoch}: valid Recall@20 {result.valid['recall@20']:.4f}; "
               f"test Recall@20 {result.test['recall@20']:.4f} NDCG@20 {result.test['ndcg@20']:.4f} "
               f"({result.train_s:.0f} s)")
    if spec.kind != "fusion":
        typer.echo(f"{variant} is an offline baseline (per-user embeddings): no servable checkpoint written")
        typer.echo(json.dumps(metrics))
        return
    path = save_checkpoint(export_payload(result.net, data, variant, spec, cfg, seed, metrics),
                           checkpoint_dir or DEFAULT_CHECKPOINT_DIR)
    typer.echo(f"checkpoint {path}")


@quality_app.command()
def evaluate(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
             seeds: int = typer.Option(3, help="Seeds for the full model (mean ± std)."),
             ablation_seeds: int = typer.Option(1, help="Seeds per ablation variant."),
             workers: int = typer.Option(2, help="Training runs in parallel (one torch thread each)."),
             cold: bool = typer.Option(True, help="Also run the cold-item split."),
             out_dir: Path = typer.Option(None, help="Report folder (default reports/quality).")) -> None:
    """Full protocol: full model over seeds, ablations, LightGCN, cold items -> <dataset>.{json,md,png}."""
    from fusion.quality import REPORT_DIR, evaluate_dataset

    out = out_dir or REPORT_DIR
    report = evaluate_dataset(dataset, seeds=tuple(range(seeds)), ablation_seeds=tuple(range(ablation_seeds)),
                              workers=workers, cold=cold, out_dir=out)
    t = report["test"]
    typer.echo(f"{dataset} test Recall@20 {t['recall@20']:.4f} ± {t['std']['recall@20']:.4f}, "
               f"NDCG@20 {t['ndcg@20']:.4f} ± {t['std']['ndcg@20']:.4f} ({report['wall_s']} s)")
    typer.echo(f"report: {out / (dataset + '.md')}")


if __name__ == "__main__":  # `python -m gateway.cli_quality evaluate` until it is mounted in gateway.cli
    quality_app()
