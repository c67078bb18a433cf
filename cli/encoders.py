"""`fusionrec encoders swap`: change one modality's encoder while serving (gateway/swap.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fusionrec.core.paths import default_config

encoders_app = typer.Typer(help="Encoders of the running service.", no_args_is_help=True)


@encoders_app.command("swap")
def swap(modality: str = typer.Argument(..., help="text, image or audio."),
         name: str = typer.Argument(..., help="Registry name of the incoming encoder (e.g. efficientnet-lite2)."),
         options: str = typer.Option("{}", help="Its options as JSON (e.g. '{\"max_length\": 128}')."),
         config: Path = typer.Option(None, "--config", "-c", envvar="FUSIONREC_CONFIG",
                                     callback=lambda v: v or default_config(),
                                     help="The Serve config the app runs (default: the packaged deploy/local.yaml)."),
         ray_address: str = typer.Option("auto", "--ray-address"), app_name: str = "fusionrec") -> None:
    """Start the new encoder beside the old one, re-encode the kept content (resumable: rerun to
    continue), refit the fusion model, switch atomically, retire the old encoder; the other
    deployments keep running untouched."""
    from fusionrec.encoders.registry import encoder_class
    from fusionrec.gateway.config import EncoderConfig
    from fusionrec.gateway.swap import swap_encoder

    try:
        encoder = EncoderConfig(name=name, options=json.loads(options))
        if encoder_class(name).modality != modality:
            raise ValueError(f"{name} encodes {encoder_class(name).modality}, not {modality}")
    except ValueError as err:  # a caller mistake: one line, no traceback
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    report = swap_encoder(modality, encoder, config, ray_address, app_name=app_name, echo=typer.echo)
    typer.echo(json.dumps(report, indent=2))
