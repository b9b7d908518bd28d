"""Pre-train a RandSAC / SAIM ViT: ``torchrun --nproc_per_node=N -m randsac_fast.train [flags]``.

Also runs as one process (``python -m randsac_fast.train``). With no flags it runs the built-in
demo: a tiny RandSAC ViT on scikit-learn's digits, then a linear probe of the frozen encoder.

Reads top to bottom: config -> data -> model (FSDP2) -> optimizer -> resume -> loop -> probe.
The components live in ``randsac_fast.config``, ``randsac_fast.data``, ``randsac_fast.runtime``
(parallel, schedule, checkpoint, metrics) and ``randsac_fast.eval`` (probe, k-NN); the Trainer
below is the glue.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from .. import config as config_mod
from .. import data as data_mod
from .. import models, ops, orders
from ..eval.knn import knn_evaluate, labelled_loaders
from ..eval.probe import digits_probe, save_json
from ..runtime.batch import plan_batch
from ..runtime import collectives
from ..runtime.checkpoint import Checkpointer, NonFiniteState, read_meta, rng_state, set_rng_state
from ..runtime.lock import lock_run_dir, release_all
from ..outputs import atomic_text
from ..runtime.preempt import EXIT_PREEMPTED, Preempted, Preemption
from ..runtime.resume_config import check_resume
from ..runtime.metrics import MetricsLogger, flops_per_image, peak_flops, require_wandb
from ..runtime.parallel import init_distributed, parallelize
from ..runtime.schedule import fit_warmup, lr_at, scaled_lr, set_lr
from ..runtime.threads import set_threads
from ..runtime.summary import pretrain_summary, run_command


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where to resume from."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and other 1-D parameters (MAE / timm convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Trainer:
    #: AdamW with fused=True on CUDA (one kernel for the whole update)
    FUSED_ADAMW = True

    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
        # ---- validate everything cheap before any process group or output exists -----------
        config_mod.validate(cfg)
        # The global batch is split by the world size torchrun announces (1 for a plain run).
        self.plan = plan_batch(t.batch_size, int(os.environ.get("WORLD_SIZE", 1)), t.accum, t.micro_batch)
        if t.wandb:
            require_wandb()
        self.threads_line = set_threads(t.threads)  # before any work: torch's default can oversubscribe a CPU
        labelled = d.knn_data or d.data         # an evaluation root (train/ + val/) before it becomes its train/
        d.data = data_mod.pretraining_root(d.data)
        if t.knn_every and d.knn_data is None and labelled != d.data:
            d.knn_data = labelled                # recorded, so --config config.json monitors the same splits
        self.source = data_mod.open_source(d.data, m.img_size, d.synthetic_size, split="train")
        config_mod.check_channels(cfg, self.source.channels)
        torch.manual_seed(t.seed)                    # identical initial weights on every rank
        model = models.build_from_config(m, self.source.channels, cfg.flags)
        self.order_spec = orders.check_fits(t.order, model.grid)
        self.grid = model.grid

        # ---- processes, run directory ------------------------------------------------------
        self.dist = init_distributed(t.device)
        self.device = self.dist.device
        rank, world = self.dist.rank, self.dist.world
        if self.dist.is_main:
            os.makedirs(t.out, exist_ok=True)
        # one run per directory, and only a directory of its own (randsac_fast.outputs); raises on every rank
        self.lock = lock_run_dir(t.out, self.dist.is_main, "train", t.force)
        collectives.barrier()

        # ---- data: per-rank shards, MAE augmentation ---------------------------------------
        mean, std = d.mean or self.source.mean, d.std or self.source.std
        self.norm = (mean, std)
        # Crops stay uint8 (files) or float (in-memory sets) and are normalised on the device.
        augment = data_mod.Augment(m.img_size, d.crop_scale, d.crop_ratio, d.hflip, mean, std, normalize=False)
        self.workers = data_mod.resolve_workers(d.workers)
        self.dataset = data_mod.AugmentedDataset(self.source, augment, t.seed)
        self.batches = data_mod.ShardedBatches(len(self.source), self.plan.per_rank, rank, world, t.seed)
        self.knn_loaders = (self._knn_loaders(labelled, mean, std) if t.knn_every else None)
        steps_per_epoch = max(1, self.batches.per_epoch // self.plan.accum)
        self.total_steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        if o.warmup_steps is not None:
            warmup, how = o.warmup_steps, f"--warmup-steps {o.warmup_steps}"
        elif o.warmup_frac is not None:
            warmup, how = round(o.warmup_frac * self.total_steps), f"--warmup-frac {o.warmup_frac:g}"
        else:
            warmup, how = round(o.warmup_epochs * steps_per_epoch), f"--warmup-epochs {o.warmup_epochs:g}"
        self.warmup, warmup_note = fit_warmup(warmup, self.total_steps, how)
        self.global_batch = self.plan.global_batch
        self.peak_lr = scaled_lr(o.blr, self.global_batch)

        # ---- model: FSDP2 per block and at the root; optimizer -----------------------------
        self.num_params = sum(p.numel() for p in model.parameters())
        self.model = parallelize(model.to(self.device), self.dist, ac=t.ac, compile=t.compile,
                                 per_block={"auto": None, "block": True, "root": False}[t.fsdp_units],
                                 master_weights=t.master_weights)
        # bf16 compute copy at world size 1 (runtime.parallel.MasterWeights), else None
        self.mixed = getattr(self.model, "master_weights", None)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=self.peak_lr,
                                           betas=tuple(o.betas),
                                           fused=self.FUSED_ADAMW and self.device.type == "cuda" or None)
        # Each rank draws its own orders (and augmentation noise) from its own generator.
        torch.manual_seed(data_mod.sample_seed(t.seed, -3, rank))
        self.order_gen = torch.Generator().manual_seed(data_mod.sample_seed(t.seed, -2, rank))

        # ---- resume ------------------------------------------------------------------------
        self.ckpt = Checkpointer(t.out, t.keep, rank, world)
        self.step, self.micro = 0, 0
        self.last_ckpt = None
        self.resumed_data: dict | None = None      # the data stream's state in the checkpoint resumed from
        if t.resume:
            path = self.ckpt.resolve(t.resume, say=self._say)
            if path is None:
                self._say(f"--resume latest: no checkpoint in {t.out} yet; starting from scratch")
            else:
                for line in check_resume(path, read_meta(path).get("config", {}), config_mod.to_dict(cfg),
                                         self.source.channels, t.allow_changed):
                    self._say(line)
                meta, state = self.ckpt.load(path, self.model, self.optimizer)
                if self.mixed is not None:
                    self.mixed.params_to_compute()
                if state is not None:
                    set_rng_state(state, self.order_gen)
                self.step, self.micro, self.last_ckpt = meta["step"], meta["micro"], path
                self.resumed_data = meta.get("data")
                self._say(f"resumed from {path} at step {self.step}")
                if self.ckpt.parent:
                    self._say(f"{path} is not the newest checkpoint of its branch: this run writes branch "
                              f"{self.ckpt.branch} (step_XXXXXXXX.branch{self.ckpt.branch}); the newer ones are kept")
        elif self.ckpt.latest() is not None:
            if not t.force:
                raise ValueError(f"--out {t.out} already holds checkpoints (newest: {self.ckpt.latest()}); pass "
                                 "--resume latest to continue that run, or --force to start from scratch beside "
                                 "them (a new branch; nothing is deleted)")
            self._say(f"--force: starting from scratch; the checkpoints in {t.out} are kept, this run writes a new branch")
        for line in [*cfg.notes, *([warmup_note] if warmup_note else []), self.threads_line]:
            self._say(line)
        if self.dist.is_main:   # only once the resume is known to be valid: a refused one changes nothing
            atomic_text(os.path.join(t.out, "config.json"), config_mod.dumps(cfg), "train")
            print(f"config ({cfg.preset} preset + flags):\n{config_mod.dumps(cfg)}", flush=True)
        self.metrics = MetricsLogger(t.out, self.dist.is_main, self.total_steps, self.step,
                                     config=config_mod.to_dict(cfg), metric_tags=("loss", "knn_top1"),
                                     wandb={"project": t.wandb_project} if t.wandb else None)
        self.peak = peak_flops(self.device)

    def _knn_loaders(self, labelled: str, mean, std):
        """The k-NN monitor's loaders; data without labelled splits is one line naming --knn-data."""
        t = self.cfg.train
        try:
            return labelled_loaders(labelled, self.cfg.model.img_size, mean, std, self.plan.per_rank, self.dist.rank,
                                    self.dist.world, limit=t.knn_images, seed=t.seed)
        except data_mod.DataError as e:
            flag = "--knn-data" if self.cfg.data.knn_data else "--data (the k-NN monitor's default)"
            raise ValueError(f"--knn-every {t.knn_every}: {flag} {labelled} has no labelled train and validation "
                             f"splits ({e}); pass --knn-data DIR, a directory holding train/ and val/ class folders "
                             "(or digits, or CIFAR pickles)") from None

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, file=sys.stderr, flush=True)

    # ---- one optimizer step: accum micro-batches ----------------------------------------------
    def train_step(self, stream) -> tuple[torch.Tensor, torch.Tensor, int, object]:
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.warmup, self.peak_lr, self.cfg.optim.min_lr))
        losses, skipped = [], 0
        accum = self.plan.accum
        for a in range(accum):
            images, _, bad = next(stream)
            skipped += bad
            images = images.to(self.device, non_blocking=True)
            order = orders.sample(self.order_spec, images.shape[0], self.grid, generator=self.order_gen,
                                  device=self.device)
            # Reduce gradients across ranks only on the last micro-batch.
            self.model.set_requires_gradient_sync(a == accum - 1)
            loss = self.model(images, order)
            (loss / accum).backward()
            if self.mixed is not None:
                self.mixed.grads_to_master()
            losses.append(loss.detach())
            self.micro += 1
        # Clip only when asked; otherwise the norm (a reduction over every gradient) is computed
        # only on the steps that log or save it (and check it is finite); None on the others.
        clip, t = self.cfg.optim.clip_grad, self.cfg.train
        n = self.step + 1
        due = (n % t.log_every == 0 or n == self.total_steps or (t.ckpt_every and n % t.ckpt_every == 0)
               or (t.knn_every and n % t.knn_every == 0))
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        elif due:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        else:
            grad_norm = None
        self.optimizer.step()
        if self.mixed is not None:
            self.mixed.params_to_compute()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return torch.stack(losses).mean(), grad_norm, skipped, order

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        checks = ops.checks_enabled(None)
        try:
            with Preemption(self.dist.rank, self.dist.world, last_good=lambda: self.last_ckpt) as self.preempt:
                self._loop()
        finally:
            ops.set_checks(checks)         # the switch is process-wide: leave it as found
        self.metrics.close()

    def _loop(self) -> None:
        with data_mod.batch_stream(self.dataset, self.batches, self.micro, self.workers,
                                   pin_memory=self.device.type == "cuda", device=self.device,
                                   norm=self.norm) as self.stream:
            self._say(f"data: {self.source.name}, {self.workers} loader workers per rank (--workers)")
            for line in data_mod.resume_changes(self.resumed_data, self.stream.state(self.micro)):
                self._say(line)
            self._steps(self.stream)

    def _steps(self, stream) -> None:
        t = self.cfg.train
        pending: list[tuple[int, torch.Tensor]] = []   # (step, loss) not yet checked / logged
        skipped, tick, tick_step = 0, time.perf_counter(), self.step
        logs, warned_input_bound = 0, False
        while self.step < self.total_steps:
            loss, grad_norm, bad, order = self.train_step(stream)
            if self.step == 1:
                ops.set_checks(False)  # inputs are valid from here on; skip the per-call syncs
            pending.append((self.step, loss))
            skipped += bad
            last = self.step == self.total_steps
            stop = self.preempt.requested()                # SIGTERM / SIGINT on any rank: all stop here
            save = last or (t.ckpt_every and self.step % t.ckpt_every == 0) or stop
            knn = (knn_evaluate(self.model, *self.knn_loaders, k=t.knn_k, device=self.device)
                   if t.knn_every and (self.step % t.knn_every == 0 or last) else None)
            if save or self.step % t.log_every == 0 or knn is not None:
                losses = self._check_losses(pending)       # never checkpoint a non-finite model
                elapsed = time.perf_counter() - tick
                images = (self.step - tick_step) * self.global_batch
                record = self._record(losses, None if grad_norm is None else _local(grad_norm), skipped, images / elapsed, order)
                if knn is not None:
                    record.update(knn_top1=knn["top1"], knn_images=knn["val_images"])
                # Time the slowest rank spent blocked on its loader (the others then wait in collectives).
                [wait] = collectives.all_reduce_values([stream.take_wait()], op=dist.ReduceOp.MAX)
                record.update(data_wait_s=wait / (self.step - tick_step), data_wait_frac=wait / elapsed)
                logs += 1                         # the first interval includes the workers' start-up
                if record["data_wait_frac"] > 0.1 and logs > 1 and not warned_input_bound:
                    warned_input_bound = True
                    self.metrics.message(
                        f"warning: {record['data_wait_frac']:.0%} of the step time went to waiting for data "
                        f"with --workers {self.workers}; raise --workers (auto uses this node's cores / ranks), "
                        "or read tar shards (--data 'shards/train-{000000..000099}.tar')")
                self.metrics.log(record)
                pending, tick, tick_step = [], time.perf_counter(), self.step
            if save:
                self.save(grad_norm)
            if stop and not last:
                raise Preempted(self.preempt.signame, self.step, self.last_ckpt)

    def _check_losses(self, pending) -> list[tuple[int, float]]:
        """Average each pending step's loss over ranks; stop on the first non-finite one."""
        values = collectives.all_reduce(torch.stack([l for _, l in pending]).float())
        values = (values / self.dist.world).tolist()
        for (step, _), v in zip(pending, values):
            if not math.isfinite(v):
                where = (f"resume from the last good checkpoint {self.last_ckpt}" if self.last_ckpt
                         else "no checkpoint was written yet")
                raise TrainingError(f"non-finite loss {v} at step {step}; stopping ({where}); try a lower "
                                    "--blr or --clip-grad")
        return [(s, v) for (s, _), v in zip(pending, values)]

    def _record(self, losses, grad_norm, skipped, img_per_s, order) -> dict:
        [bad] = collectives.all_reduce_values([skipped], dtype=torch.int64)
        record = {"step": self.step, "loss": losses[-1][1], "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": None if grad_norm is None else float(grad_norm),   # None: a stop between log steps
                  "img_per_s": img_per_s, "skipped_images": int(bad),
                  "epoch": self.micro / self.batches.per_epoch}
        if len(losses) > 1:  # every step's loss, so curves (and exact-resume checks) see all of them
            record["losses"] = [v for _, v in losses]
        if self.peak:
            fpi, how = flops_per_image(self.model, order, self.num_params)
            record.update(mfu=fpi * img_per_s / (self.peak * self.dist.world), flops_counted_as=how,
                          max_mem_gib=torch.cuda.max_memory_allocated(self.device) / 2**30)
        return record

    def save(self, grad_norm=None) -> None:
        """Collective. Refuses a non-finite state (checked here, on every rank: parameters, optimizer
        state and the last gradient norm) with TrainingError naming the last good checkpoint."""
        meta = {"micro": self.micro, "data": self.stream.state(self.micro),
                "total_steps": self.total_steps, "warmup_steps": self.warmup,
                "peak_lr": self.peak_lr, "config": config_mod.to_dict(self.cfg)}
        try:
            self.last_ckpt = self.ckpt.save(self.step, self.model, self.optimizer, meta, rng_state(self.order_gen),
                                            grad_norm=grad_norm)
        except NonFiniteState as e:
            where = (f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt
                     else "no checkpoint was written yet")
            raise TrainingError(f"{e} ({where}); try a lower --blr or --clip-grad") from None

    # ---- linear probe (digits) and the ordered end of a run -------------------------------------
    def probe(self) -> dict | None:
        """Probe the trained encoder, a random-init one of the same seed and the raw pixels on rank 0,
        save ``probe.json`` in the run directory, and hand the result to every rank. Collective: no
        rank goes on (to teardown) before rank 0 has finished and saved."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result = None
        if self.dist.is_main and self.cfg.data.data != "digits":
            self._say("the built-in linear probe needs --data digits; skipped")
        elif self.dist.is_main:
            m = self.cfg.model
            torch.manual_seed(self.cfg.train.seed)     # the very weights the run started from
            fresh = models.build_from_config(m, self.source.channels, self.cfg.flags)
            result = digits_probe(fresh, full, m.img_size, *self.norm)
            result.update(step=self.step, checkpoint=self.last_ckpt, path=os.path.join(self.cfg.train.out, "probe.json"))
            save_json(result, result["path"])
        return collectives.broadcast_object(result)

    def finish(self) -> None:
        """Every rank waits here for all the others (their writers were closed at the end of
        ``train``, the probe is saved), so the process group is torn down only when no rank has work
        left on it — no rank tears down while rank 0 still probes."""
        collectives.barrier()


def main(argv=None) -> int:
    from .. import started
    started()                # Ctrl-C is this command's to handle from here
    cfg = config_mod.parse_args(argv)
    try:
        return run_command(lambda _: _run(cfg), errors=(ValueError, FileNotFoundError, ImportError, TrainingError,
                                                        ops.BackendUnavailable))
    except KeyboardInterrupt:   # Ctrl-C before the training loop took over the signal
        print("interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return 130
    finally:
        release_all()           # the run-directory lock


def _run(cfg: config_mod.Config) -> int:
    trainer = Trainer(cfg)
    try:
        trainer.train()
    except Preempted as e:      # the checkpoint is written: say so, leave together, exit 75
        if trainer.dist.is_main:
            print(str(e), file=sys.stderr, flush=True)
        collectives.barrier()   # torchrun stops the other workers as soon as the first one exits
        return EXIT_PREEMPTED
    result = trainer.probe() if cfg.train.probe else None   # saved to probe.json before teardown
    trainer.finish()                                         # every rank here before the group goes
    if trainer.dist.is_main:
        pretrain_summary(cfg.train.out, trainer.last_ckpt, cfg.data.data, result)
    return 0


def exit_process(code: int) -> None:
    """End the command: flush, then leave without the interpreter's teardown.

    Once a model was sharded with FSDP2, the gloo process group outlives ``destroy_process_group``
    (held by native references of the device mesh / DTensor machinery, not by Python objects: its
    threads ``gloo_tcp_loop`` and ``pt_gloo_runloop`` keep running even after the model is deleted
    and garbage collected; without FSDP they stop). Tearing the interpreter and the C++ statics
    down under those running threads is what sporadically aborted the end of a run, even with one
    process: "terminate called without an active exception", SIGABRT after the probe line. By now
    everything is written and flushed (checkpoint, metrics, probe.json) and every rank has passed
    the final barrier, so skipping the teardown loses nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The ``randsac-train`` console script: :func:`main`, ended like ``python -m randsac_fast.train``."""
    exit_process(main())


if __name__ == "__main__":
    cli()
