"""Resuming with changed settings: a model-shape change is refused naming the field; a training
setting change is refused without --allow-changed and printed with it; free fields may change."""
from __future__ import annotations

import os

import pytest

from randsac_fast import config as config_mod
from randsac_fast.runtime.resume_config import FREE_FIELDS, SHAPE_FIELDS, check_resume, compare

TINY = ["--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--decoder-depth", "1", "--decoder-num-heads", "2",
        "--batch-size", "16", "--steps", "2", "--log-every", "1", "--probe", "false"]


def _cfg(*flags) -> dict:
    return config_mod.to_dict(config_mod.parse_args([*TINY, *flags]))


def test_every_listed_field_exists():
    fields = {f for sec in ("model", "data", "optim", "train") for f in _cfg()[sec]}
    assert set(SHAPE_FIELDS) <= fields and set(FREE_FIELDS) <= fields


@pytest.mark.parametrize("flags, field", [(["--embed-dim", "32"], "embed_dim"), (["--depth", "2"], "depth"),
                                          (["--num-heads", "4"], "num_heads"), (["--patch-size", "4"], "patch_size"),
                                          (["--model", "randsac_vit_small"], "model")])
def test_model_shape_change_is_refused_naming_the_field(flags, field):
    with pytest.raises(ValueError) as e:
        check_resume("ckpt", _cfg(), _cfg(*flags), 1, allow_changed=True)
    msg = str(e.value)
    assert f"the checkpoint's model has {field}=" in msg and "a model-shape change cannot resume" in msg
    assert "\n" not in msg


def test_model_default_spelled_out_is_no_change():
    # decoder_depth None (the tiny model's default, 3) vs an explicit 3: the same model.
    saved = config_mod.to_dict(config_mod.parse_args(["--embed-dim", "16", "--depth", "1", "--num-heads", "2"]))
    saved["model"]["decoder_depth"] = None
    now = config_mod.to_dict(config_mod.parse_args(["--embed-dim", "16", "--depth", "1", "--num-heads", "2",
                                                    "--decoder-depth", "3"]))
    assert compare(saved, now, 1) == ([], [])


def test_training_setting_change_needs_allow_changed_and_is_printed():
    saved, now = _cfg(), _cfg("--batch-size", "8", "--seed", "3", "--blr", "1e-3", "--order", "square:16")
    with pytest.raises(ValueError, match=r"training settings differ from the checkpoint's \(blr 0.008 -> 0.001, "
                                         r"batch_size 16 -> 8, seed 0 -> 3, order 'square:4' -> 'square:16'\); "
                                         "pass --allow-changed"):
        check_resume("ckpt", saved, now, 1, allow_changed=False)
    lines = check_resume("ckpt", saved, now, 1, allow_changed=True)
    assert "warning: resuming ckpt with a changed training setting: seed 0 -> 3" in lines and len(lines) == 4


def test_free_fields_and_fields_new_since_the_checkpoint_do_not_count():
    saved = _cfg()
    del saved["train"]["force"]                                   # a field the old version did not have
    now = _cfg("--log-every", "5", "--keep", "4", "--ckpt-every", "1", "--backend", "sdpa", "--force", "true",
               "--out", "elsewhere", "--resume", "latest")
    assert check_resume("ckpt", saved, now, 1, allow_changed=False) == []


def test_trainer_refuses_changes_in_one_line_and_leaves_the_run_as_it_was(tmp_path, capsys):
    from randsac_fast import train
    out = tmp_path / "run"
    assert train.main([*TINY, "--out", str(out)]) == 0
    config_before = (out / "config.json").read_text()
    capsys.readouterr()

    assert train.main([*TINY, "--out", str(out), "--resume", "latest", "--embed-dim", "32"]) == 1
    err = capsys.readouterr().err
    assert ("error: --resume " in err and "the checkpoint's model has embed_dim=16, this run asks for embed_dim=32; "
            "a model-shape change cannot resume: resume with the run's own settings: --config "
            f"{out / 'config.json'} --resume " in err and "Traceback" not in err), err
    assert len(err.strip().splitlines()) == 1

    # A data set with another channel count, allowed as a setting, still cannot load: one line naming the tensor.
    assert train.main([*TINY, "--out", str(out), "--resume", "latest", "--data", "synthetic",
                       "--synthetic-size", "64", "--allow-changed", "true"]) == 1
    err = capsys.readouterr().err
    assert "warning: resuming" in err and "data 'digits' -> 'synthetic'" in err
    assert ("error: --resume " in err and "parameter patch_embed.proj.weight has shape (16, 1, 2, 2) in the checkpoint "
            "but (16, 3, 2, 2) in this model" in err and "Traceback" not in err), err

    assert train.main([*TINY, "--out", str(out), "--resume", "latest", "--steps", "3"]) == 1
    assert "training settings differ from the checkpoint's (steps 2 -> 3)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config_before          # refused resumes changed nothing
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]

    assert train.main([*TINY, "--out", str(out), "--resume", "latest", "--steps", "3", "--allow-changed", "true"]) == 0
    err = capsys.readouterr().err
    assert "with a changed training setting: steps 2 -> 3" in err and "at step 2" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000003"]

    assert train.main([*TINY, "--out", str(out)]) == 1                 # from scratch over checkpoints: refused
    assert ("already holds checkpoints (newest: " in capsys.readouterr().err)
    assert train.main([*TINY, "--out", str(out), "--force", "true"]) == 0
    assert "step_00000002.branch1" in os.listdir(out / "checkpoints")


def test_resume_advice_names_every_differing_field_and_the_runs_config(tmp_path, capsys):
    """Sizes that came from flags (or a preset) and are missing on resume: the refusal names both
    fields and the command that works, and that command resumes."""
    from randsac_fast import train
    out = tmp_path / "run"
    sized = ["--img-size", "16", "--patch-size", "4", "--order", "square:4"]
    assert train.main([*TINY, *sized, "--out", str(out)]) == 0
    capsys.readouterr()
    assert train.main([*TINY, "--out", str(out), "--resume", "latest"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "img_size 16 -> 8" in err and "patch_size 4 -> 2" in err and f"--config {out / 'config.json'}" in err
    advice = err.split("--config ", 1)[1].split(",")[0].split()          # CONFIG --resume PATH
    assert train.main(["--config", *advice, "--steps", "3", "--allow-changed"]) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000003"]


def test_the_reproduce_command_after_a_resume_reproduces(tmp_path, capsys):
    """config.json after a resume records the run, not how it was resumed: the summary's
    'reproduce' command trains it again from scratch, to the same losses."""
    import json
    import shlex

    from randsac_fast import train
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "1", "--out", str(out)]) == 0
    assert train.main([*TINY, "--steps", "2", "--out", str(out), "--resume", "latest", "--allow-changed"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["train"]["resume"], saved["train"]["allow_changed"]) == (None, False)
    assert "resume" not in saved["flags"] and "allow_changed" not in saved["flags"]
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("reproduce"))
    argv = shlex.split(line.split("reproduce", 1)[1])[3:]                # after python -m randsac_fast.train
    assert train.main(argv) == 0
    again = argv[argv.index("--out") + 1]

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
                if "loss" in r}
    assert losses(again) == losses(str(out)) and sorted(losses(again)) == [1, 2]
    assert os.listdir(os.path.join(again, "checkpoints")) == ["step_00000002"]        # trained, not resumed
