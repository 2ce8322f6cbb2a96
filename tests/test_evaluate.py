"""The `evaluate` command (the ZTSNR experiment): metrics, and its mechanics on a random tiny SDXL."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from diffusers import EulerDiscreteScheduler
from PIL import Image

from sdxl_trainer.data.demo import COLORS
from sdxl_trainer.main import main
from sdxl_trainer.models.evaluate import brightness, color_errors, mean_colors, resolve_model, svg_grid
from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig

REPORT_KEYS = {
    "black_brightness", "white_brightness", "color_error",
    "terminal_x0_black_brightness", "terminal_x0_white_brightness", "prompts", "scheduler", "settings",
}
FAST = ["--seeds", "2", "--steps", "2", "--guidance", "2", "--size", "64", "--device", "cpu"]


def test_metrics_on_known_images():
    images = np.zeros((2, 4, 4, 3), dtype=np.float32)
    images[1] = 1.0
    assert brightness(images).tolist() == [0.0, 1.0]
    assert mean_colors(images).tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert color_errors(images, (0, 0, 0)).tolist() == pytest.approx([0.0, 3**0.5])
    half = np.zeros((1, 2, 2, 3), dtype=np.float32)
    half[0, 0] = [1.0, 0.0, 0.0]  # top row red, bottom row black: mean (0.5, 0, 0)
    assert color_errors(half, (255, 0, 0)).tolist() == pytest.approx([0.5])
    # A model that always makes mid-grey: the mean distance to the demo colours, in closed form.
    grey = np.full((1, 2, 2, 3), 0.5, dtype=np.float32)
    expected = np.mean([np.linalg.norm(np.asarray(rgb) / 255.0 - 0.5) for rgb in COLORS.values()])
    assert np.mean([color_errors(grey, rgb)[0] for rgb in COLORS.values()]) == pytest.approx(expected)


def test_svg_grid_shows_box_averaged_colours():
    image = np.zeros((8, 8, 3), dtype=np.float32)
    image[:4, :4] = [1.0, 0.0, 0.0]  # top-left quarter red
    image[4:, 4:, 2] = 0.5  # bottom-right quarter half blue
    svg = svg_grid([("completely <red> & more", (220, 30, 30), image[None])], ["seed 0"], blocks=2, cell=20)
    root = ET.fromstring(svg)  # well-formed XML: labels are escaped
    ns = "{http://www.w3.org/2000/svg}"
    fills = [rect.get("fill") for rect in root.iter(f"{ns}rect")]
    # background, target swatch, then the 2 x 2 blocks row by row
    assert fills == ["#ffffff", "#dc1e1e", "#ff0000", "#000000", "#000000", "#000080"]
    assert "completely <red> & more" in [text.text for text in root.iter(f"{ns}text")]


def test_a_run_directory_means_its_final_pipeline(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "model_index.json").write_text("{}")
    assert resolve_model(str(tmp_path / "run")) == str(tmp_path / "run" / "final")
    assert resolve_model(str(tmp_path / "run" / "final")) == str(tmp_path / "run" / "final")
    assert resolve_model("builtin:tiny-base") == "builtin:tiny-base"


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_evaluate_on_a_tiny_pipeline(tmp_path, tiny_pipeline_dir, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_pipeline_dir), "--out", str(out), *FAST]) == 0
    report = _last_json_line(capsys.readouterr().out)
    assert REPORT_KEYS <= set(report)
    assert json.loads((out / "evaluate.json").read_text()) == report
    for key in ("black_brightness", "white_brightness", "terminal_x0_black_brightness", "terminal_x0_white_brightness"):
        assert 0.0 <= report[key] <= 1.0, key
    assert 0.0 <= report["color_error"] <= 3**0.5
    assert set(report["prompts"]) == {f"completely {color}" for color in COLORS}
    black = report["prompts"]["completely black"]
    assert len(black["per_seed"]) == 2 and black["target"] == pytest.approx([10 / 255] * 3, abs=1e-5)
    assert report["color_error"] == pytest.approx(np.mean([p["color_error"] for p in report["prompts"].values()]))
    # Its own scheduler: the conftest model is epsilon with leading spacing, so it never starts at t=999.
    assert report["scheduler"]["prediction_type"] == "epsilon"
    assert report["scheduler"]["timestep_spacing"] == "leading"
    assert report["scheduler"]["first_timestep"] < 999
    svg = ET.parse(out / "evaluate.svg").getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}rect")) == 1 + (len(COLORS) + 2) * (1 + 2 * 16)
    grid = Image.open(out / "evaluate.png")
    assert grid.height == 14 + (len(COLORS) + 2) * 64  # one row per colour, then x0 black and white
    assert grid.width >= 3 * 64  # target swatch + 2 seeds


def test_evaluate_samples_a_ztsnr_model_from_pure_noise(tmp_path, tiny_pipeline_dir, capsys):
    model = tmp_path / "ztsnr-model"
    shutil.copytree(tiny_pipeline_dir, model)
    ztsnr = DiffusionObjective(ObjectiveConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    EulerDiscreteScheduler(**ztsnr.scheduler_config()).save_config(model / "scheduler")
    assert main(["evaluate", str(model), "--out", str(tmp_path / "eval"), *FAST]) == 0
    scheduler = _last_json_line(capsys.readouterr().out)["scheduler"]
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["first_timestep"] == 999
    assert scheduler["first_sigma"] == pytest.approx(4096.0, rel=1e-3)  # diffusers' stand-in for infinite noise


def test_evaluate_bad_arguments_exit_2(tmp_path, tiny_pipeline_dir, capsys):
    assert main(["evaluate", str(tiny_pipeline_dir), "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
