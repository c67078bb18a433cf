"""`fusionrec eval-ranking`: a thin Typer wrapper around fusionrec.ranking.evaluate (report: fusionrec.ranking.report)."""

from __future__ import annotations

from pathlib import Path

import typer


def eval_ranking(dataset: str = typer.Option("lfm2k", help="lfm2k or ml-100k."),
                 seeds: int = typer.Option(3, help="Seeds (retrieval model + ranker each); mean ± std."),
                 candidates_n: int = typer.Option(100, help="Retrieval candidates the ranker re-scores per user."),
                 mmr_lambda: str = typer.Option("valid", help="Also report ranking + MMR: at this λ (0..1), "
                                                "with λ chosen on valid per seed (\"valid\"), or not (\"none\")."),
                 members: int = typer.Option(1, help="Nets per retrieval model (the served full model has 4)."),
                 workers: int = typer.Option(2, help="Retrieval training runs in parallel (one torch thread each)."),
                 retrain: bool = typer.Option(False, help="Train the retrieval models again even when recorded."),
                 out_dir: Path = typer.Option(None, help="Report folder (default reports/quality)."),
                 set_: list[str] = typer.Option([], "--set", help="TrainConfig override of the retrieval model, "
                                                "KEY=VALUE (JSON value), repeatable, as `fusionrec evaluate --set`."),
                 ) -> None:
    """Retrieval-only vs the trained ranking stage (and + MMR) over seeds, with paired tests over users ->
    ranking-<dataset>.{json,md,png}."""
    from fusionrec.cli.quality import _overrides
    from fusionrec.core.paths import reports_dir
    from fusionrec.ranking.evaluate import evaluate_ranking
    from fusionrec.ranking.report import write_ranking_report

    report = evaluate_ranking(dataset, tuple(range(seeds)), candidates_n,
                              _mmr_setting(mmr_lambda), members, workers, retrain,
                              echo=typer.echo, config=_overrides(set_))
    path = write_ranking_report(report, out_dir or reports_dir())
    for variant, t in report["tests"].items():
        s = report["summary"][variant]["ndcg@20"]
        typer.echo(f"{dataset} {variant}: NDCG@20 {s['mean']:.4f} ± {s['std']:.4f} (retrieval "
                   f"{report['summary']['retrieval']['ndcg@20']['mean']:.4f}), Wilcoxon p {t['ndcg@20']['p_wilcoxon']:.2g}")
    typer.echo(f"report: {path}")


def _mmr_setting(value: str) -> float | str | None:
    """--mmr-lambda as evaluate_ranking takes it; anything else fails with the accepted forms."""
    if value in ("valid", "none"):
        return None if value == "none" else value
    try:
        lam = float(value)
    except ValueError:
        lam = -1.0
    if not 0.0 <= lam <= 1.0:
        raise typer.BadParameter(f"--mmr-lambda must be a number in [0, 1], 'valid' or 'none', got {value!r}")
    return lam
