"""The end of a multi-rank run is ordered: probe saved, every rank waits, then teardown; no thread left.

Two gloo ranks run the trainer's whole ``main`` (a step, a checkpoint, the probe, the teardown) 20
times in a row inside one launch: each attempt gets its own process group (a fresh file store), so
each one goes through ``destroy_process_group`` exactly as a real run's end does, and the launch ends
as the command does (``exit_process``). The gloo worker threads that FSDP2 keeps alive past
``destroy_process_group`` (see ``exit_process``) are native, not Python threads, and are left to the
process exit.
"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTEMPTS = 20

WORKER = textwrap.dedent("""
    import json, os, sys, threading
    import torch.distributed as dist
    from randsac_fast.train.trainer import exit_process, main

    root, attempts = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ["RANK"])
    tiny = ["--embed-dim", "16", "--depth", "1", "--num-heads", "1", "--decoder-depth", "1",
            "--decoder-num-heads", "1", "--batch-size", "32", "--steps", "1", "--ckpt-every", "1",
            "--log-every", "1", "--probe", "true"]
    for i in range(attempts):
        store = dist.FileStore(os.path.join(root, f"store_{i}"), 2)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
        out = os.path.join(root, f"run_{i}")
        rc = main([*tiny, "--out", out])
        assert rc == 0, f"attempt {i}: main returned {rc}"
        assert not dist.is_initialized(), f"attempt {i}: the process group outlived main"
        alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        assert not alive, f"attempt {i}: threads alive after main: {alive}"
        # The result is on disk before teardown, on every rank's view of the run directory.
        result = json.load(open(os.path.join(out, "probe.json")))
        assert 0.0 < result["pretrained"] <= 1 and 0.0 < result["random_init"] <= 1 and result["raw_pixels"] > 0.9
        assert os.path.exists(os.path.join(out, "checkpoints", "step_00000001", "meta.json"))
        print(f"attempt {i} ok", flush=True)
    exit_process(0)       # as the command ends (python -m randsac_fast.train)
""")


def test_two_rank_run_ends_cleanly_twenty_times_in_a_row(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(ATTEMPTS)], cwd=ROOT, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{err[-3000:]}"
        assert "terminate called" not in err, err[-3000:]
        assert out.count(" ok") == ATTEMPTS, out
    # Rank 0 alone reports, once per attempt, and names the file it saved.
    assert outs[0][0].count("result file") == ATTEMPTS and "result file" not in outs[1][0]
