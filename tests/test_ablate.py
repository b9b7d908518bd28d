"""The order ablation end to end on a tiny grid: cells trained and probed, outputs written, resumable."""
import json
import os

import pytest

from randsac_fast import ablate

TINY = ["--embed-dim", "16", "--depth", "1", "--num-heads", "1", "--decoder-depth", "1", "--decoder-num-heads", "1",
        "--batch-size", "64", "--steps", "2", "--log-every", "1"]


def test_ablation_grid_end_to_end_and_resumable(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["--specs", "raster,square:4,square:3", "--seeds", "0,1", "--out", str(out), "--eval-images", "300", *TINY]
    summary = ablate.run(args)
    err = capsys.readouterr().err
    assert "skipping square:3" in err                       # 3 squares do not tile a 4x4 grid: said, not run
    report = json.loads((out / "ablation.json").read_text())
    assert sorted((c["spec"], c["seed"]) for c in report["cells"]) == [("raster", 0), ("raster", 1),
                                                                        ("square:4", 0), ("square:4", 1)]
    for c in report["cells"]:
        assert 0.1 < c["probe"] <= 1 and 0.1 < c["knn"] <= 1 and c["steps"] == 2   # chance is 0.1
    assert set(summary["specs"]) == {"raster", "square:4"} and "square:3" in report["skipped"]
    assert summary["best_by_probe"] in summary["specs"] and summary["best_by_knn"] in summary["specs"]
    for s in summary["specs"].values():
        assert len(s["probe"]["seeds"]) == 2 and len(s["knn"]["seeds"]) == 2 and s["probe"]["std"] >= 0
    table = (out / "ablation.md").read_text()
    assert "| `raster` |" in table and "| `square:4` |" in table and "k-NN" in table
    if _has_matplotlib():
        assert (out / "ablation.png").stat().st_size > 1000
    # The seeds differ (different weights, different orders), so the cells are really separate runs.
    assert report["cells"][0]["probe"] != report["cells"][1]["probe"] or report["cells"][0]["knn"] != report["cells"][1]["knn"]

    # Rerun raster with one more seed: its two finished cells are read back, only the new one trains.
    stamp = {p: os.path.getmtime(p) for p in out.glob("cells/*/result.json")}
    again = ablate.run(["--specs", "raster", "--seeds", "0,1,2", *args[4:]])
    printed = capsys.readouterr().out
    assert printed.count("done before") == 2 and printed.count("seed 2: probe") == 1
    assert {p: os.path.getmtime(p) for p in stamp} == stamp
    assert again["specs"]["raster"]["probe"]["seeds"][:2] == summary["specs"]["raster"]["probe"]["seeds"]

    # A finished cell is not reused under other settings: one clear error, nothing rerun or lost.
    changed = [a if a != "2" else "3" for a in args[4:]]                   # --steps 2 -> 3
    with pytest.raises(ValueError, match=r"raster_seed0/result.json was trained with other settings \(steps 2 -> 3\)"):
        ablate.run(["--specs", "raster", "--seeds", "0", *changed])
    assert {p: os.path.getmtime(p) for p in stamp} == stamp


def test_method_comparison_randsac_saim_aim(tmp_path, capsys):
    """--presets: one cell per (preset, seed), each preset with its own model and order, every cell
    scored by the linear probe, k-NN and the attentive probe."""
    out = tmp_path / "methods"
    flags = ["--embed-dim", "16", "--num-heads", "1", "--batch-size", "64", "--steps", "2", "--log-every", "1"]
    summary = ablate.run(["--presets", "digits,saim_digits,aim_digits", "--seeds", "0", "--out", str(out),
                          "--eval-images", "300", "--no-plot", *flags])
    report = json.loads((out / "ablation.json").read_text())
    got = {c["label"]: (c["config"]["model"]["model"], c["spec"]) for c in report["cells"]}
    assert got == {"digits": ("randsac_vit_tiny", "square:4"), "saim_digits": ("saim_vit_tiny", "random"),
                   "aim_digits": ("aim_vit_tiny", "prefix")}
    assert summary["metrics"] == ["probe", "knn", "attn"]
    for c in report["cells"]:
        assert 0.1 < c["attn"] <= 1
    assert "attentive probe" in (out / "ablation.md").read_text()
    with pytest.raises(ValueError, match="unknown preset 'aim'"):
        ablate.run(["--presets", "digits,aim", "--out", str(out)])


def test_ablation_refuses_flags_it_sets_per_cell(tmp_path, capsys):
    assert ablate.main(["--out", str(tmp_path), "--order", "random"]) == 1
    assert "error: --order is set per cell by the ablation; use --specs" in capsys.readouterr().err


def test_spearman_rank_correlation():
    assert ablate._spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ablate._spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ablate._spearman([1, 2], [1, 2]) is None


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
