"""The commands as a user meets them: no traps (--data without --preset starts from the folder preset, help that shows the values
used, an evaluation root as pre-training data), runs that explain themselves (a closing summary
whose next commands run as printed, results.json, validation accuracy in the progress line, one
error line instead of a traceback on any rank), TensorBoard hparams and offline wandb, --config
files, one flag style, and the console scripts."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
import torch

from randsac_fast import config, data, interop, models, train, viz
from randsac_fast.eval import attnprobe, finetune, linprobe
from randsac_fast.runtime import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-depth", "1",
              "--decoder-num-heads", "2"]
TINY_ARGS = ["--model", "randsac_vit_tiny", "--set", "num_heads=2,img_size=8"]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _run(main, argv) -> tuple[int, str]:
    """(exit code, stdout) of a command's main(argv)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _next_steps(text: str) -> dict[str, list[str]]:
    """The 'next:' block of a summary -> {label: argv after 'python -m randsac_fast.<module>'}."""
    steps, on = {}, False
    for line in text.splitlines():
        if line == "next:":
            on = True
        elif on and line.startswith("  "):
            label, cmd = line.strip().split("  ", 1)
            steps[label] = shlex.split(cmd.split("#")[0])
    return steps


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default command, smaller: two steps on the digits, then the built-in probe."""
    out = str(tmp_path_factory.mktemp("run") / "digits")
    code, text = _run(train.main, [*TINY_MODEL, "--steps", "2", "--log-every", "1", "--out", out])
    assert code == 0
    return out, text


# --------------------------------------------------------------------------------------------
# Traps
# --------------------------------------------------------------------------------------------
def test_data_without_preset_starts_from_the_folder_preset(tmp_path):
    # Not the 8x8 digits demo: your own images get the folder preset, and it is said.
    cfg = config.parse_args(["--data", str(tmp_path)])
    assert cfg.preset == "folder" and (cfg.model.img_size, cfg.model.patch_size) == (64, 8)
    assert len(cfg.notes) == 1 and "without --preset" in cfg.notes[0] and "preset folder" in cfg.notes[0]
    # A preset, or explicit sizes, are a choice: accepted.
    assert config.parse_args(["--preset", "randsac_cifar10_square", "--data", str(tmp_path)]).model.img_size == 32
    cfg = config.parse_args(["--data", str(tmp_path), "--img-size", "32", "--patch-size", "4"])
    assert (cfg.model.img_size, cfg.model.patch_size) == (32, 4)
    assert config.parse_args(["--data", "synthetic"]).preset == "digits"   # sized by --img-size itself


def test_help_shows_the_values_the_run_uses(tmp_path, monkeypatch, capsys):
    def help_of(*argv):
        with pytest.raises(SystemExit):
            config.parse_args([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())      # unwrap the help's line breaks
    assert "(default: from preset digits: 8)" in help_of()             # not the field default 32
    assert "(default: from preset saim_in1k_vitb: 224)" in help_of("--preset", "saim_in1k_vitb")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text("[model]\nimg_size = 16\n")
    assert "(default: from run.toml: 16)" in help_of("--config", "run.toml")
    assert "--hflip, --no-hflip" in help_of()


def test_evaluation_root_pretrains_on_its_train_split(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, text = _run(train.main, ["--data", str(tmp_path), "--img-size", "8", "--patch-size", "2", *TINY_MODEL,
                                       "--batch-size", "4", "--steps", "1", "--no-probe", "--out", str(out)])
    assert code == 0
    assert f"pre-training on {tmp_path / 'train'}" in err.getvalue()
    assert json.loads((out / "config.json").read_text())["data"]["data"] == str(tmp_path / "train")
    # 8 images (train/ only), not 16 in two classes "train" and "val"
    assert len(data.open_source(data.pretraining_root(str(tmp_path)), 8)) == 8
    assert _next_steps(text)["linear probe"][_next_steps(text)["linear probe"].index("--data") + 1] == str(tmp_path)


# --------------------------------------------------------------------------------------------
# Runs that explain themselves
# --------------------------------------------------------------------------------------------
def test_train_summary_and_its_next_commands_run_as_printed(digits_run, tmp_path):
    out, text = digits_run
    assert "== pre-training done ==" in text
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    for needle in (f"run directory  {out}", f"checkpoint     {ckpt}", os.path.join(out, "metrics.jsonl"),
                   "linear probe accuracy"):
        assert needle in text, needle
    steps = _next_steps(text)
    assert set(steps) == {"linear probe", "attn probe", "timm export", "figure", "reproduce"}
    mains = {"randsac_fast.linprobe": linprobe.main, "randsac_fast.attnprobe": attnprobe.main,
             "randsac_fast.interop": interop.main, "randsac_fast.viz": viz.main}
    for label in ("linear probe", "attn probe", "timm export", "figure"):
        argv = steps[label][3:] + (["--epochs", "1", "--warmup-epochs", "0"] if "probe" in label else [])
        code, said = _run(mains[steps[label][2]], argv)
        assert code == 0, label
        assert " done" in said.splitlines()[0], said
    for probe in ("linprobe", "attnprobe"):
        result = json.load(open(os.path.join(out, probe, "results.json")))
        assert 0.0 <= result["top1"] <= 1.0 and result["ckpt"] == ckpt and result["val_images"] == 450
    assert os.path.exists(os.path.join(out, "recon.png"))


def test_finetune_writes_results_and_shows_val_accuracy(digits_run, tmp_path, capsys):
    out, _ = digits_run
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    code = finetune.main(["--ckpt", ckpt, "--data", "digits", "--out", str(tmp_path), "--steps", "3",
                          "--batch-size", "16", "--augment", "none", "--mixup", "0", "--cutmix", "0"])
    assert code == 0
    said = capsys.readouterr()
    result = json.load(open(tmp_path / "results.json"))
    assert result["val_images"] == 450 and result["step"] == 3
    assert f"val top-1 {result['top1']:.2%}" in said.err                 # the progress line
    assert "== fine-tune done ==" in said.out and str(tmp_path / "results.json") in said.out


def test_bad_input_is_one_error_line_with_exit_code_1(tmp_path, capsys):
    assert train.main(["--preset", "randsac_cifar10_square", "--data", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and "does not exist" in err
    assert viz.main(["orders", "--spec", "square:3", "--grid", "4", "--out", str(tmp_path / "o.png")]) == 1
    assert capsys.readouterr().err.count("error:") == 1


_RANKS_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from randsac_fast.runtime.parallel import init_distributed
    from randsac_fast.runtime.summary import run_command

    def case(name):
        def body(_):
            init_distributed("cpu")
            if name == "every-rank":
                raise ValueError("the same bad input on every rank")
            if dist.get_rank() == 1:
                raise ValueError("shard 1 is unreadable")
            dist.all_reduce(torch.ones(1))        # rank 0 waits here for rank 1, which has failed
        return body

    for name, port in zip(("every-rank", "one-rank"), sys.argv[1:]):   # one process group each
        os.environ["MASTER_PORT"] = port
        print(f"{name} exit {run_command(case(name))}", file=sys.stderr, flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_rank_says_one_line_and_the_others_exit(tmp_path):
    """Two gloo ranks started as torchrun would (RANK/WORLD_SIZE/MASTER_*), without its agent: an
    error every rank has is one line; an error of one rank is its line, and the other rank stops
    (one line saying why) instead of hanging in the collective."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    ports = [str(_free_port()), str(_free_port())]
    procs = [subprocess.Popen([sys.executable, str(script), *ports], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("Traceback" in e for e in errs), errs
    for rank, err in enumerate(errs):
        assert "every-rank exit 1" in err and "one-rank exit 1" in err, err
    every, one = [], []
    for err in errs:
        first, second = err.split("every-rank exit 1")
        every += [l for l in first.splitlines() if l.startswith("error")]
        one += [l for l in second.splitlines() if l.startswith("error")]
    assert every == ["error: the same bad input on every rank"] or \
        every == ["error (rank 1 of 2): the same bad input on every rank"], every       # once
    assert "error (rank 1 of 2): shard 1 is unreadable" in one
    assert len(one) <= 2 and all("shard 1" in l or "another process" in l for l in one), one


def test_error_before_the_process_group_is_printed_by_rank_0_only(monkeypatch, capsys, tmp_path):
    def bad(_):
        raise ValueError("bad flag value")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert summary.run_command(bad) == 1 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert summary.run_command(bad) == 1 and capsys.readouterr().err == "error: bad flag value\n"
    # Under torchrun the worker's error file carries the line, so torchrun's own report names the cause.
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert summary.run_command(bad) == 1
    assert json.load(open(tmp_path / "error.json"))["message"]["extraInfo"]["py_callstack"] == "error: bad flag value"


# --------------------------------------------------------------------------------------------
# TensorBoard hparams, wandb
# --------------------------------------------------------------------------------------------
def test_tensorboard_has_the_config_as_hparams(digits_run):
    pytest.importorskip("tensorboard", reason="needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    out, _ = digits_run
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    content = acc.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
                 for t, c in content.items() if t.endswith("session_start_info"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert start.hparams["model/embed_dim"].number_value == cfg["model"]["embed_dim"] == 32
    assert start.hparams["train/order"].string_value == cfg["train"]["order"]
    experiment = next(plugin_data_pb2.HParamsPluginData.FromString(c).experiment
                      for t, c in content.items() if t.endswith("experiment"))
    assert "loss" in [m.name.tag for m in experiment.metric_infos]


def test_wandb_offline_logs_the_run(digits_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="needs wandb (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, _ = digits_run
    code, _ = _run(linprobe.main, ["--ckpt", os.path.join(out, "checkpoints", "step_00000002"), "--data", "digits",
                                   "--out", str(tmp_path), "--epochs", "1", "--wandb"])
    assert code == 0
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    assert any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))


def test_wandb_missing_is_one_line_naming_pip_install(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)          # import wandb -> ImportError
    assert linprobe.main(["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", "digits", "--out", str(tmp_path), "--wandb"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install wandb" in err
    assert train.main(["--wandb", "--out", str(tmp_path)]) == 1
    assert "pip install wandb" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "tiny.pt")
    torch.save(models.build("randsac_vit_tiny", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                            decoder_depth=1, in_chans=1).state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------
# Conventions: --config, flag style, console scripts
# --------------------------------------------------------------------------------------------
def test_config_json_of_a_run_reproduces_it_and_flags_override(digits_run, capsys):
    out, _ = digits_run
    path = os.path.join(out, "config.json")
    written = json.load(open(path))
    again = config.parse_args(["--config", path])
    assert json.loads(config.dumps(again)) == written                     # every field, preset and flags
    changed = config.parse_args(["--config", path, "--steps", "7", "--no-hflip"])
    assert changed.train.steps == 7 and changed.data.hflip is False and changed.model.embed_dim == 32


def test_config_toml_sets_fields_over_its_preset(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "randsac_cifar10_square"\nsteps = 5\n\n[model]\nimg_size = 16\n\n'
                    '[optim]\nbetas = [0.9, 0.99]\nclip_grad = "none"\n')
    cfg = config.parse_args(["--config", str(toml), "--data", str(tmp_path)])
    assert cfg.preset == "randsac_cifar10_square" and cfg.optim.blr == 1e-3          # from the preset
    assert (cfg.model.img_size, cfg.train.steps, cfg.optim.betas) == (16, 5, (0.9, 0.99))   # from the file
    assert cfg.optim.clip_grad is None and {"img_size", "steps", "betas", "data"} <= set(cfg.flags)
    toml.write_text("[model]\nimg_sise = 16\n")
    assert "run.toml: model.img_sise is not a config field" in _parse_error(["--config", str(toml)], capsys)
    toml.write_text("[model]\nimg_size = 'big'\n")
    assert "model.img_size: expected int, got 'big'" in _parse_error(["--config", str(toml)], capsys)
    toml.write_text("[model\n")
    assert "not valid TOML" in _parse_error(["--config", str(toml)], capsys)


def test_boolean_flags_are_x_and_no_x_everywhere(capsys):
    assert config.parse_args(["--no-hflip"]).data.hflip is False
    assert config.parse_args(["--hflip"]).data.hflip is True
    assert config.parse_args(["--no-probe"]).train.probe is False
    cfg = config.parse_args(["--share-weight", "--no-norm-pix"])
    assert cfg.model.share_weight is True and cfg.model.norm_pix is False
    assert config.parse_args([]).model.share_weight is None                   # unset: the model's default
    # The older spelling still reads.
    assert config.parse_args(["--probe", "false", "--hflip=true"]).train.probe is False
    assert "--ac: expected true or false, got 'maybe'" in _parse_error(["--ac", "maybe"], capsys)
    for parser in (linprobe.build_parser(), finetune.build_parser()):
        base = ["--ckpt", "x", "--data", "digits"]
        assert parser.parse_args(base + ["--cls-token"]).cls_token is True
        assert parser.parse_args(base + ["--no-cls-token"]).cls_token is False
        assert parser.parse_args(base + ["--no-wandb"]).wandb is False


def test_lists_are_comma_separated_everywhere(tmp_path):
    assert config.parse_args(["--betas", "0.9,0.99"]).optim.betas == (0.9, 0.99)
    assert interop.parse_sets(["num_heads=2,img_size=8"]) == interop.parse_sets(["num_heads=2", "img_size=8"]) \
        == {"num_heads": 2, "img_size": 8}
    code, said = _run(viz.main, ["orders", "--spec", "square:6", "--grid", "4,6", "--n", "1",
                                 "--out", str(tmp_path / "a.png")])
    assert code == 0 and "figure" in said and os.path.exists(tmp_path / "a.png")
    code, _ = _run(viz.main, ["orders", "--spec", "square:6", "--grid", "4", "6", "--n", "1",   # the older spelling
                              "--out", str(tmp_path / "b.png")])
    assert code == 0


def _scripts() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]


def test_console_scripts_name_every_command():
    assert {"randsac-train", "randsac-linprobe", "randsac-finetune", "randsac-interop", "randsac-viz",
            "randsac-info", "randsac-ablate", "randsac-data"} <= set(_scripts())


@pytest.mark.parametrize("name", sorted(_scripts()))
def test_console_script_points_at_a_main(name):
    module, _, func = _scripts()[name].partition(":")
    mod = importlib.import_module(module)
    assert callable(getattr(mod, func))
    if name == "randsac-train":     # main(), ended without the interpreter's teardown (see exit_process)
        assert getattr(mod, func) is train.trainer.cli
