"""One progress bar for every loop a person waits for (fedfms.progress): silent off a terminal, where the loops'
own lines stay few; drawn on a terminal (forced here), with lines printed above it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fedfms.data.synthetic import make_disc_site
from fedfms.evaluation.centralized import train_centralized
from fedfms.models import ModelConfig, build_model, travel_state_dict
from fedfms.progress import bar, drawn, lines_above
from fedfms.training.predict import predict_cases
from fedfms.training.trainer import TrainConfig

TINY = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0)


def test_a_bar_is_silent_off_a_terminal_and_lines_print_above_a_drawn_one(capsys):
    quiet = bar(range(3), desc="x", unit="case")
    assert not drawn(quiet) and list(quiet) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    said = []
    assert lines_above(quiet, said.append) == said.append  # nothing to step around
    shown = bar(total=2, desc="files", unit="file", enabled=True)
    assert drawn(shown)
    say = lines_above(shown, said.append)
    shown.update()
    say("done one")
    shown.update()
    shown.close()
    assert said == ["done one"] and "files: " in capsys.readouterr().err


def test_centralized_logs_a_tenth_of_its_epochs_off_a_terminal(tmp_path):
    sites = [make_disc_site(tmp_path / f"s{k}", site=f"s{k}", num_volumes=3, slices_per_volume=2, seed=k) for k in range(2)]
    lines = []
    train = TrainConfig(lr=1e-3, val_fraction=0.34, max_steps_per_epoch=1, progress=False, threads=1)
    train_centralized(TINY, train, sites, epochs=20, out_weights=tmp_path / "w.pt", log=lines.append)
    epochs = [line.split()[2] for line in lines if line.strip().startswith("centralized epoch")]
    assert epochs == [f"{e}/20:" for e in range(2, 21, 2)], lines  # ten lines for twenty epochs, the last one included


def test_predict_shows_a_bar_over_its_files(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save(travel_state_dict(build_model(TINY), "fedmsa"), weights)
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / f"t{k}.png")
    capsys.readouterr()
    predict_cases(TINY, weights, [tmp_path / "t0.png", tmp_path / "t1.png"], tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "predict: checking:" in err and "\rpredict: " in err and "/2 [" in err
    predict_cases(TINY, weights, [tmp_path / "t0.png"], tmp_path / "out2")  # default: no bar off a terminal
    assert capsys.readouterr().err == ""
