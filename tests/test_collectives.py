"""Collectives carry tensors of the process group's device (NCCL has no CPU backend).

Every collective of the package goes through ``randsac_fast.runtime.collectives`` (checked by reading
the source), and the trainer's logging / k-NN / checkpoint path and the evaluation commands run
under a device-strict process group (``tests/strict_group.py``: compute device ``emu``, a CPU tensor
in a collective is refused as NCCL refuses it). Each scenario runs in a subprocess of its own: the
emulated device changes process-wide state.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "randsac_fast")
TESTS = os.path.join(ROOT, "tests")

# torch.distributed's collectives (tensor and object ones, point to point, barrier).
_COLLECTIVE = (r"(all_reduce|all_gather\w*|all_to_all\w*|broadcast\w*|reduce|reduce_scatter\w*|gather\w*|"
               r"scatter\w*|barrier|monitored_barrier|send|recv|isend|irecv|batch_isend_irecv)")
_CALL = re.compile(r"\b(?:dist|torch\.distributed|c10d)\." + _COLLECTIVE + r"\s*\(")
_IMPORT = re.compile(r"from\s+torch\.distributed(?:\.distributed_c10d)?\s+import\s+[^\n]*\b" + _COLLECTIVE + r"\b")


# Exemptions, each with its reason. ops/ sits below runtime/ (tests/test_layout.py), so the tile sweep's
# one object broadcast (a Python tuple, no tensor of ours; torch stages object collectives on the
# group's device itself) calls torch.distributed directly.
_EXEMPT = {os.path.join("randsac_fast", "runtime", "collectives.py"): None,
           os.path.join("randsac_fast", "ops", "autotune.py"): "broadcast_object_list"}


def test_no_collective_outside_the_helper():
    """A direct ``dist.all_reduce(t)`` elsewhere could carry a host tensor past the device placement."""
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            if rel in _EXEMPT and _EXEMPT[rel] is None:
                continue
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                code = line.split("#", 1)[0]
                if rel in _EXEMPT and f"dist.{_EXEMPT[rel]}(" in code:
                    continue
                if _CALL.search(code) or _IMPORT.search(code):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, ("call these through randsac_fast.runtime.collectives (it places tensors on the "
                           "process group's device):\n" + "\n".join(offenders))


def test_the_grep_sees_a_direct_collective():
    """The check above bites: the patterns match the calls it must refuse, not the helper's."""
    assert _CALL.search("        dist.all_reduce(wait, op=dist.ReduceOp.MAX)")
    assert _CALL.search("    torch.distributed.broadcast_object_list(box, src=0)")
    assert _CALL.search("dist.barrier()")
    assert _IMPORT.search("from torch.distributed import all_gather, get_rank")
    assert not _CALL.search("collectives.all_reduce(values)") and not _CALL.search("dist.ReduceOp.MAX")
    assert not _CALL.search("dist.get_world_size()")


def _strict(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the strict group set up (``use_strict_group()`` done)."""
    prelude = "import strict_group\nstrict_group.use_strict_group()\n"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=timeout)


# A very small RandSAC on digits (as in test_train_distributed), no loader workers.
_TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
         "--decoder-depth", "1", "--decoder-num-heads", "2", "--order", "square:4", "--batch-size", "16",
         "--probe", "false", "--blr", "5e-3", "--warmup-steps", "2", "--workers", "0"]


def test_trainer_logs_knn_and_saves_under_a_device_strict_group(tmp_path):
    """Log every step (data wait, skipped images, losses), the k-NN monitor, checkpoints, then a
    resume: the path a GPU run takes at its first log step, under a group that refuses host tensors."""
    out = str(tmp_path / "run")
    args = [*_TINY, "--out", out, "--log-every", "1", "--ckpt-every", "2", "--knn-every", "3", "--knn-images", "64"]
    r = _strict(f"""
        from randsac_fast.train import trainer
        import torch.distributed as dist
        assert trainer.main({[*args, "--steps", "3"]!r}) == 0
        if dist.is_initialized():
            dist.destroy_process_group()
        assert trainer.main({[*args, "--steps", "4", "--resume", "latest", "--allow-changed", "true"]!r}) == 0
        print("OK")
    """, tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [rec["step"] for rec in records] == [1, 2, 3, 4]
    assert all(rec["skipped_images"] == 0 and rec["data_wait_s"] >= 0 for rec in records)
    assert "knn_top1" in records[2]
    assert os.path.exists(os.path.join(out, "checkpoints", "step_00000004", "meta.json"))


def test_helper_linprobe_and_finetune_under_a_device_strict_group(tmp_path):
    """The strict group refuses a host tensor where NCCL would; the helper places it; the evaluation
    commands run under it (the probe: DDP head, evaluation counts; fine-tuning: its loss reduction)."""
    r = _strict("""
        import torch, torch.distributed as dist
        from randsac_fast.runtime import collectives, parallel
        d = parallel.init_distributed("auto")
        assert d.device == torch.device("emu", 0), d
        assert collectives.group_device() == d.device
        try:                                   # what NCCL does with a host tensor
            dist.all_reduce(torch.ones(1))
            raise SystemExit("a CPU tensor passed the strict group")
        except RuntimeError as e:
            assert "got a tensor on cpu" in str(e), e
        out = collectives.all_reduce(torch.tensor([2.0, 3.0]), op=dist.ReduceOp.MAX)
        assert out.device == d.device and out.tolist() == [2.0, 3.0]
        assert collectives.all_reduce_values([7], dtype=torch.int64) == [7]
        [part] = collectives.all_gather(torch.arange(3))
        assert part.device == d.device and part.tolist() == [0, 1, 2]
        on = torch.ones(2, device=d.device)
        assert collectives.on_group_device(on) is on          # no copy when it is already there
        collectives.barrier()
        dist.destroy_process_group()
        from randsac_fast import models
        from randsac_fast.eval import finetune, linprobe
        torch.manual_seed(0)
        torch.save(models.build("randsac_vit_tiny", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                                decoder_depth=1, in_chans=1).state_dict(), "tiny.pt")
        args = ["--ckpt", "tiny.pt", "--model", "randsac_vit_tiny", "--set", "num_heads=2", "--set", "img_size=8",
                "--data", "digits", "--batch-size", "256", "--augment", "none"]
        lp = linprobe.run([*args, "--out", "lp", "--epochs", "1", "--warmup-epochs", "0", "--log-every", "5"])
        dist.destroy_process_group()
        ft = finetune.run([*args, "--out", "ft", "--steps", "2", "--log-every", "1", "--mixup", "0", "--cutmix", "0",
                           "--eval-every", "1"])
        assert lp["val_images"] == ft["val_images"] == 450, (lp, ft)
        print("OK")
    """, tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
