"""`fusionrec train` on real lfm2k data: every net of the ensemble trains, and the checkpoint serves what was evaluated."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fusionrec.fusion.train.data import load_dataset
from fusionrec.fusion.train.quality import served_metrics
from fusionrec.fusion.registry import get_fusion_model
from fusionrec.cli.quality import quality_app


@pytest.fixture(scope="module")
def lfm2k(data_dir):
    if not (data_dir / "lfm2k").is_dir():
        pytest.skip(f"lfm2k missing under {data_dir}")
    return load_dataset("lfm2k")


def test_train_writes_an_ensemble_checkpoint_that_serves_its_metrics(lfm2k, tmp_path):
    result = CliRunner().invoke(quality_app, ["train", "--members", "2", "--epochs", "1", "--workers", "1",
                                              "--checkpoint-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert re.search(r"net 0 \(seed 0\).*\n.*net 1 \(seed 1\)", result.output)
    evaluated = float(re.search(r"full \(2 nets\): .*test Recall@20 ([0-9.]+)", result.output).group(1))
    checkpoint = re.search(r"checkpoint (\S+\.pt)", result.output).group(1)
    model = get_fusion_model("trained", lfm2k.modality_dims(), checkpoint=checkpoint,
                             encoder_versions=lfm2k.encoder_versions)
    assert model.members == 2 and model.dim == 2 * 4 * 64  # 2 nets x (text, vggish, whisper, id) x 64
    assert served_metrics(checkpoint, lfm2k)["recall@20"] == pytest.approx(evaluated, abs=1e-4)


def test_unknown_variant_fails_loudly():
    result = CliRunner().invoke(quality_app, ["train", "--variant", "nope"])
    assert result.exit_code != 0 and "unknown variant 'nope'" in str(result.exception)
