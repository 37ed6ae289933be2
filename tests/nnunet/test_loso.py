"""FednnU-Net through the project's evaluation protocol: `fedfms loso fednnunet_tiny` runs a fold end to end (FLARE's
simulator: planning, one round, held-out scoring; the centralised nnU-Net beside it) and `fedfms table1` shows it."""

import json

import pytest

from fedfms.cli import main
from fedfms.data.synthetic import make_disc_site
from fedfms.evaluation.results import FOLD_FILE


@pytest.mark.integration
def test_loso_fednnunet_tiny_fold_and_its_table1_rows(tmp_path, capsys):
    """Two small synthetic sites, one fold (hold out a), one round of 10 nnU-Net iterations: about 1 min on 2 cores."""
    root = tmp_path / "sites"
    for i, (name, brightness) in enumerate((("a", 0.3), ("b", 0.4))):
        make_disc_site(root / name, site=name, num_volumes=3, slices_per_volume=4, brightness=brightness, seed=20 + i)
    ws = tmp_path / "ws"
    assert main(["loso", "fednnunet_tiny", "--data-root", str(root), "--workspace", str(ws), "--rounds", "1",
                 "--holdout", "a", "--centralized"]) == 0
    fold = json.loads((ws / "a" / FOLD_FILE).read_text())
    assert fold["status"] == "done" and fold["model_config"]["variant"] == "nnunet"
    assert fold["train_config"]["total_epochs"] == 1  # nnU-Net's poly schedule over the job's 1 round
    app = next((ws / "a" / "simulator").rglob("app_server"))
    assert (app / "nnunet_plan.json").is_file()  # the federation's one plan, beside the global model it scores with
    fed, central = fold["results"]["federated"], fold["results"]["centralized"]
    assert fed["num_samples"] == 12 and 0 <= fed["dice"] <= 1 and 0 <= central["dice"] <= 1
    assert fed["reference_on"] == "probabilities"
    capsys.readouterr()

    assert main(["table1", str(ws), "--scoring", "honest"]) == 0
    text = capsys.readouterr().out
    assert f"| FednnU-Net | {fed['dice']:.3f} | {fed['iou']:.3f} | - | - |" in text
    assert text.index("| FednnU-Net |") < text.index("| nnU-Net (centralised) |")
