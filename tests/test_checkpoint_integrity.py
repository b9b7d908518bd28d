"""Checkpoint integrity, lineage and the never-save-broken rule (one process group of size 1; a
trainer run in process for the end-to-end case)."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import torch.distributed as dist

import randsac_fast.runtime.checkpoint as ck
from randsac_fast.runtime.checkpoint import CheckpointError, Checkpointer, DamagedCheckpoint, NonFiniteState
from helpers import tiny_model_and_optimizer




def _save(cp, step, model, opt, **kw):
    return cp.save(step, model, opt, {"micro": step}, {"x": step}, **kw)


def _names(tmp_path):
    return sorted(os.listdir(tmp_path / "checkpoints"))


# ---- integrity ---------------------------------------------------------------------------------
def test_save_records_every_file_and_verifies(group, tmp_path):
    model, opt = tiny_model_and_optimizer()
    path = _save(Checkpointer(str(tmp_path), keep=2, rank=0, world=1), 1, model, opt)
    meta = json.load(open(os.path.join(path, "meta.json")))
    on_disk = sorted(n for n in os.listdir(path) if n != "meta.json")
    assert sorted(meta["files"]) == on_disk and ".metadata" in on_disk and "rank_0.pt" in on_disk
    for name, rec in meta["files"].items():
        assert rec["size"] == os.path.getsize(os.path.join(path, name)) and len(rec["sha256"]) == 64
    assert Checkpointer(str(tmp_path), keep=2, rank=0, world=1).verify(path) is None


def _flip(path):
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _shard(ckpt):
    return next(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith(".distcp"))


def _edit_meta(ckpt):
    meta = json.load(open(os.path.join(ckpt, "meta.json")))
    meta["step"] = 99
    json.dump(meta, open(os.path.join(ckpt, "meta.json"), "w"))


DAMAGE = {
    "flipped byte in a shard": (lambda c: _flip(_shard(c)), "does not match its recorded sha256"),
    "truncated shard": (lambda c: _truncate(_shard(c)), "(truncated?)"),
    "truncated .metadata": (lambda c: _truncate(os.path.join(c, ".metadata")), ".metadata has"),
    "missing rank state": (lambda c: os.remove(os.path.join(c, "rank_0.pt")), "rank_0.pt is missing"),
    "edited meta.json": (_edit_meta, "meta.json does not match its recorded digest"),
    "truncated meta.json": (lambda c: _truncate(os.path.join(c, "meta.json")), "meta.json cannot be read"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_reported_and_skipped(group, tmp_path, damage):
    harm, needle = DAMAGE[damage]
    model, opt = tiny_model_and_optimizer()
    cp = Checkpointer(str(tmp_path), keep=3, rank=0, world=1)
    good = _save(cp, 2, model, opt)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    newest = _save(cp, 3, model, opt)
    harm(newest)

    said = []
    assert cp.resolve("latest", say=said.append) == good                 # falls back ...
    assert len(said) == 2 and newest in said[0] and needle in said[0] and "skipping it" in said[0], said
    assert said[1] == f"--resume latest: the newest intact checkpoint is {good}"
    with pytest.raises(DamagedCheckpoint, match="the checkpoint is damaged") as e:   # ... an explicit one: refused
        cp.resolve(newest)
    assert needle in str(e.value) and f"the newest intact checkpoint is {good}" in str(e.value)
    assert os.path.isdir(newest)                                           # nothing is deleted

    meta, state = Checkpointer(str(tmp_path), keep=3, rank=0, world=1).load(good, model, opt)
    assert meta["step"] == 2 and state == {"x": 2}


def test_every_checkpoint_damaged_is_one_clear_error(group, tmp_path):
    model, opt = tiny_model_and_optimizer()
    cp = Checkpointer(str(tmp_path), keep=3, rank=0, world=1)
    _flip(_shard(_save(cp, 1, model, opt)))
    with pytest.raises(DamagedCheckpoint, match=r"--resume latest: no intact checkpoint in .*step_00000001: "
                                                r"__0_0.distcp does not match its recorded sha256"):
        cp.resolve("latest")


# ---- never save a broken state, never prune before the new one is good -------------------------
@pytest.mark.parametrize("poison", ["parameter", "optimizer state", "gradient norm"])
def test_non_finite_state_is_never_saved_and_nothing_is_pruned(group, tmp_path, poison):
    model, opt = tiny_model_and_optimizer()
    cp = Checkpointer(str(tmp_path), keep=1, rank=0, world=1)
    good = _save(cp, 1, model, opt)
    grad_norm = torch.tensor(1.0)
    with torch.no_grad():
        if poison == "parameter":
            model[1].bias.fill_(float("nan"))
        elif poison == "optimizer state":
            opt.state[model[0].weight]["exp_avg_sq"][0, 0] = float("inf")
        else:
            grad_norm = torch.tensor(float("inf"))
    with pytest.raises(NonFiniteState, match="step 2: .*this state is not saved") as e:
        _save(cp, 2, model, opt, grad_norm=grad_norm)
    expected = {"parameter": "1 of 4 parameter tensors hold NaN/Inf (first: 1.bias)",
                "optimizer state": "optimizer exp_avg_sq of 0.weight",
                "gradient norm": "the gradient norm"}[poison]
    assert expected in str(e.value)
    assert _names(tmp_path) == ["step_00000001"] and cp.verify(good) is None and cp.last_good == good


def test_huge_but_finite_values_are_saved(group, tmp_path):
    # The check screens with a sum, which overflows here: it must not call this state broken.
    model, opt = tiny_model_and_optimizer()
    with torch.no_grad():
        model[0].weight.fill_(3e38)
    assert ck.non_finite_state(model, opt) is None
    _save(Checkpointer(str(tmp_path), keep=1, rank=0, world=1), 1, model, opt)


def test_trainer_refuses_to_checkpoint_nan_weights_after_a_finite_loss(tmp_path, monkeypatch, capsys):
    """The --blr 1e6 case: step 2's loss is finite, the update after it is not."""
    from randsac_fast import train
    from randsac_fast.train import trainer as trainer_mod
    real_step = trainer_mod.Trainer.train_step

    def step_then_blow_up(self, stream):
        out = real_step(self, stream)
        if self.step == 2:
            with torch.no_grad():
                p = next(self.model.parameters())
                (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_then_blow_up)
    out = tmp_path / "run"
    argv = ["--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--decoder-depth", "1", "--decoder-num-heads",
            "2", "--batch-size", "16", "--steps", "4", "--ckpt-every", "1", "--keep", "1", "--log-every", "1",
            "--probe", "false", "--out", str(out)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    first = str(out / "checkpoints" / "step_00000001")
    assert (f"error: step 2: 1 of " in err and "parameter tensors hold NaN/Inf (first: " in err
            and f"this state is not saved (the last good checkpoint is {first}); try a lower --blr or "
                "--clip-grad" in err and "Traceback" not in err), err[-2000:]
    assert _names(out) == ["step_00000001"]                        # kept, despite --keep 1
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert Checkpointer(str(out), 1, 0, 1).verify(first) is None   # "last good" is true
    finally:
        dist.destroy_process_group()


# ---- a full disk --------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["DCP shard writer", "meta.json writer"])
def test_full_disk_says_so_and_leaves_no_debris(group, tmp_path, monkeypatch, where):
    model, opt = tiny_model_and_optimizer()
    cp = Checkpointer(str(tmp_path), keep=2, rank=0, world=1)
    good = _save(cp, 1, model, opt)
    if where == "DCP shard writer":
        import torch.distributed.checkpoint.filesystem as fs
        real = fs._write_item

        def half_then_full(transforms, stream, data, *rest):
            stream.write(b"\0" * 64)                   # some bytes reach the disk, then it is full
            _enospc()
        monkeypatch.setattr(fs, "_write_item", half_then_full)
        assert real is not half_then_full
    else:
        real = ck._write_durable
        monkeypatch.setattr(ck, "_write_durable",
                            lambda path, write: _enospc() if path.endswith("meta.json") else real(path, write))
    with pytest.raises(CheckpointError) as e:
        _save(cp, 2, model, opt)
    root = str(tmp_path / "checkpoints")
    assert str(e.value) == (f"no space left on {root}: the checkpoint of step 2 was not written and its partial "
                            f"files were removed (the last good checkpoint is {good}); free space, then resume "
                            "with --resume latest")
    assert _names(tmp_path) == ["step_00000001"]                  # no .tmp_ debris, nothing lost
    assert cp.resolve("latest") == good


# ---- lineage -----------------------------------------------------------------------------------
def test_resuming_from_the_past_writes_a_new_branch_that_pruning_keeps(group, tmp_path):
    model, opt = tiny_model_and_optimizer()
    first = Checkpointer(str(tmp_path), keep=10, rank=0, world=1)
    for step in (2, 4, 6, 8):
        _save(first, step, model, opt)
    past = str(tmp_path / "checkpoints" / "step_00000002")

    branch = Checkpointer(str(tmp_path), keep=2, rank=0, world=1)
    branch.load(branch.resolve(past), model, opt)
    assert branch.branch == 1 and branch.parent == "step_00000002"
    for step in (4, 6, 8, 10):
        assert _save(branch, step, model, opt).endswith(f"step_{step:08d}.branch1")
    assert _names(tmp_path) == ["step_00000002", "step_00000004", "step_00000006", "step_00000008",
                                "step_00000008.branch1", "step_00000010.branch1"]   # the old branch is kept
    meta = json.load(open(tmp_path / "checkpoints" / "step_00000010.branch1" / "meta.json"))
    assert meta["branch"] == 1 and meta["parent"] == "step_00000002"

    again = Checkpointer(str(tmp_path), keep=2, rank=0, world=1)      # latest = the newest branch, continued
    newest = again.resolve("latest")
    assert newest.endswith("step_00000010.branch1")
    again.load(newest, model, opt)
    assert again.branch == 1 and again.parent is None
    assert _save(again, 12, model, opt).endswith("step_00000012.branch1")

    old = Checkpointer(str(tmp_path), keep=2, rank=0, world=1)        # the newest of branch 0: continues it
    old.load(str(tmp_path / "checkpoints" / "step_00000008"), model, opt)
    assert old.branch == 0
    _save(old, 10, model, opt)
    assert old.resolve("latest").endswith("step_00000010")
    assert _names(tmp_path) == ["step_00000008", "step_00000010", "step_00000010.branch1",
                                "step_00000012.branch1"]


def test_fresh_start_beside_checkpoints_is_a_new_branch(group, tmp_path):
    model, opt = tiny_model_and_optimizer()
    _save(Checkpointer(str(tmp_path), keep=1, rank=0, world=1), 5, model, opt)
    fresh = Checkpointer(str(tmp_path), keep=1, rank=0, world=1)
    for step in (1, 2):
        _save(fresh, step, model, opt)
    assert _names(tmp_path) == ["step_00000002.branch1", "step_00000005"]
    assert fresh.resolve("latest").endswith("step_00000002.branch1")
