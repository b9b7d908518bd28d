"""The trainer end to end, as users launch it: torchrun with 2 gloo ranks on CPU, and bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import step_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A very small RandSAC on digits so that each launch takes seconds.
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--decoder-depth", "1", "--decoder-num-heads", "2", "--order", "square:4", "--batch-size", "16",
        "--probe", "false", "--blr", "5e-3", "--warmup-steps", "2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    return env


def _cmd(args, ranks=2):
    if ranks == 1:
        return [sys.executable, "-m", "randsac_fast.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--standalone", "-m", "randsac_fast.train", *args]


def _run(args, ranks=2, timeout=240):
    return subprocess.run(_cmd(args, ranks), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_two_ranks_learn_digits(tmp_path):
    out = tmp_path / "run"
    r = _run([*TINY, "--out", str(out), "--steps", "30", "--log-every", "1", "--knn-every", "15",
              "--knn-images", "200"])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = {rec["step"]: rec["knn_top1"] for rec in recs if "knn_top1" in rec}
    assert sorted(knn) == [15, 30] and all(0.3 < a <= 1.0 for a in knn.values()), knn   # chance is 0.1
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.9 * first, (first, last)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "img_per_s", "skipped_images"} <= set(rec)
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 30
    assert os.path.exists(out / "checkpoints" / "step_00000030" / "meta.json")


def test_sigkill_then_resume_is_bitwise_exact(tmp_path):
    args = [*TINY, "--steps", "24", "--ckpt-every", "4", "--keep", "10", "--log-every", "1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = _run([*args, "--out", str(ref)])
    assert r.returncode == 0, r.stderr[-3000:]

    # Start the same run, SIGKILL every process of it as soon as its first checkpoint is complete.
    proc = subprocess.Popen(_cmd([*args, "--out", str(cut)]), cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = cut / "checkpoints" / "step_00000004" / "meta.json"
    deadline = time.time() + 180
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    assert not (cut / "checkpoints" / "step_00000024").exists(), "the run finished before it was killed"

    r = _run([*args, "--out", str(cut), "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    expected, got = step_losses(ref), step_losses(cut)
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    assert got == expected          # bitwise: JSON round-trips floats exactly


@pytest.mark.parametrize("args, needle", [
    (["--img-size", "30", "--patch-size", "4"], "image size 30 is not divisible by patch size 4"),
    (["--order", "square:16/4", "--img-size", "12", "--patch-size", "4"], "square:16"),
    (["--data", "/no/such/dir"], "data directory '/no/such/dir' does not exist"),
    (["--model", "randsac_vit_huge"], "unknown model 'randsac_vit_huge'"),
])
def test_bad_inputs_fail_with_one_clear_error(tmp_path, args, needle, capsys):
    from randsac_fast.train import main
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')       # an earlier run's output
    assert main([*TINY, "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err[-2000:]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'   # nothing earlier is lost


def test_two_ranks_saim_synthetic_with_activation_checkpointing(tmp_path):
    # SAIM's query stream calls its blocks through .cross (not forward): FSDP2 must gather for it too
    # (per-block units, as on CUDA; the CPU default is one unit at the root).
    out = tmp_path / "saim"
    r = _run(["--model", "saim_vit_tiny", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
              "--depth", "2", "--num-heads", "2", "--order", "random", "--data", "synthetic",
              "--synthetic-size", "64", "--blur-kernel", "3", "--batch-size", "8", "--steps", "2",
              "--log-every", "1", "--ac", "true", "--fsdp-units", "block", "--probe", "false", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(step_losses(out)) == [1, 2]
