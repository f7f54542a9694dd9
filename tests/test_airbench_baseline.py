"""bench/airbench_baseline.py, the side-by-side airbench94 run of the GPU check's stage i: the
data files its loader reads, and the figures read back from its printed table, also when
the run is stopped part-way. airbench94 itself needs CUDA and is not shipped here; a
stand-in script prints a table in its layout."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, make_folder
from PIL import Image

sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
import airbench_baseline
import gpu_check

COLUMNS = ["run   ", "epoch", "train_loss", "val_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]


def table_row(cells: list[str]) -> str:
    """A row as airbench94 prints it: each cell right-aligned to its column's header, between bars."""
    return "".join(f"|  {cell.rjust(len(column))}  " for cell, column in zip(cells, COLUMNS, strict=True)) + "|"


def test_the_data_files_hold_the_folder_in_the_layout_airbench94_reads(tmp_path):
    folder = make_folder(tmp_path / "images", per_class=3, test_per_class=2)

    counts = airbench_baseline.write_airbench_data(str(folder), tmp_path / "work")

    assert counts == {"train": 6, "test": 4}
    train = torch.load(tmp_path / "work" / "cifar10" / "train.pt")
    assert train["classes"] == ["cat", "dog"]
    assert train["images"].dtype == torch.uint8 and train["images"].shape == (6, 32, 32, 3)
    assert train["labels"].dtype == torch.int64 and sorted(train["labels"].tolist()) == [0, 0, 0, 1, 1, 1]
    # Height, width, channel: each image as the file holds it, with its class's label.
    first_dog = train["images"][train["labels"].tolist().index(1)]
    files = [np.asarray(Image.open(path)) for path in sorted((folder / "train" / "dog").iterdir())]
    assert any(np.array_equal(first_dog.numpy(), pixels) for pixels in files)
    assert torch.load(tmp_path / "work" / "cifar10" / "test.pt")["images"].shape == (4, 32, 32, 3)


def airbench_table() -> list[str]:
    """Three runs' rows in airbench94's layout: run 0's first epoch and eval row, then runs 1 and 2."""
    return [
        table_row(COLUMNS),
        table_row(["0", "1", "2.0531", "1.9852", "0.3071", "0.4021", "", "1.4523"]),
        table_row(["", "eval", "1.1201", "1.0514", "0.8612", "0.9312", "0.9402", "4.1011"]),
        table_row(["1", "1", "2.0412", "1.9795", "0.3152", "0.4103", "", "0.2401"]),
        table_row(["", "eval", "1.1187", "1.0532", "0.8598", "0.9301", "0.9388", "2.4012"]),
        table_row(["2", "eval", "1.1194", "1.0519", "0.8601", "0.9320", "0.9376", "2.3811"]),
    ]


def stand_in_script(path, sleep_s: float):
    """A script that prints :func:`airbench_table`, then sleeps ``sleep_s`` seconds."""
    path.write_text(
        textwrap.dedent(f"""
            import time
            for line in {airbench_table()!r}:
                print(line)
            print("-" * 40)
            time.sleep({sleep_s})
        """)
    )
    return path


def test_a_run_stopped_at_its_timeout_keeps_the_runs_it_finished(tmp_path):
    script = stand_in_script(tmp_path / "airbench94.py", sleep_s=60)

    output, stopped = airbench_baseline.run_script(script, tmp_path, timeout_s=3)

    assert stopped
    runs = airbench_baseline.parse_eval_rows(output)
    assert runs == [
        {"tta_val_acc": 0.9402, "seconds": 4.1011},
        {"tta_val_acc": 0.9388, "seconds": 2.4012},
        {"tta_val_acc": 0.9376, "seconds": 2.3811},
    ]
    summary = airbench_baseline.summary(runs)  # the first run, CUDA's start-up in it, left out
    assert summary["warm_runs"] == 2
    assert summary["median_seconds"] == (2.4012 + 2.3811) / 2
    assert summary["mean_tta_val_acc"] == pytest.approx((0.9388 + 0.9376) / 2)


@pytest.mark.parametrize(
    ("speedrun_accuracy", "verdict", "accuracy_detail"),
    [(0.9380, "ok", "accuracy -0.02 points"), (0.9350, "below target", "accuracy -0.32 points")],
)
def test_stage_i_sets_the_speedrun_recipe_against_airbench94(tmp_path, speedrun_accuracy, verdict, accuracy_detail):
    folder = make_folder(tmp_path / "images", per_class=2)
    report = gpu_check.Report()
    report.figures.update(f_median_gpu_s=3.0, f_mean_accuracy=speedrun_accuracy)
    script = stand_in_script(tmp_path / "airbench94.py", sleep_s=0)
    (tmp_path / "check").mkdir()

    gpu_check.stage_i(report, tmp_path / "check", folder, script, smoke=False)

    rows = {row[1]: row[2:] for row in report.rows}
    assert rows["airbench94, 2 warm runs"][0] == "measured"
    assert report.figures["i_speedrun_over_airbench94_s"] == 3.0 / ((2.4012 + 2.3811) / 2)
    found_verdict, detail = rows["speedrun against airbench94"]
    assert found_verdict == verdict
    assert detail.startswith("GPU time 1.25 of airbench94's") and accuracy_detail in detail
    # The data files stay out of the check's folder, which a device session brings back whole.
    assert not list((tmp_path / "check").rglob("*.pt"))
