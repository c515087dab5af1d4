"""The plumbing of one training run around Alg. 1's loop (diffusionad.train): run folder and lock, data checked and
split, device, resume, compile, checkpointing and torchrun, the loss log, checkpoints, Ctrl-C / SIGTERM and
--max-minutes. And `launch`: one class, a whole benchmark, or one class data-parallel under torchrun."""
import csv
import math
import os
import signal
import sys
import time

import torch

import data
from extras import reports
from extras.anomalies import random_crops, trainset
from extras.benchmarks import train_benchmark
from extras.checkpoints import check_same_run, load_checkpoint, lock_run, run_folder, save_checkpoint, write_config
from extras.checks import or_exit, preflight
from extras.distributed import in_process_group, rank_and_world, torchrun_env
from extras.folders import aspects, find_classes, holdout_split
from extras.speed import compile_report, memory_format, pick_device, training_forward


def lr_at(step, lr, schedule, total):
    """The learning rate of 0-based `step` of `total`: constant (the paper) or a cosine decay to 0 at the last step."""
    return lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * step / total))


def ignore_sigint(_):
    """DataLoader workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def launch(cfg, opts, resume, train):
    """train(cfg, opts, resume) on one class; on a benchmark root every class in turn; under torchrun, one class
    data-parallel."""
    classes = [] if opts.data.startswith("synthetic") else find_classes(opts.data)
    if classes:
        return train_benchmark(cfg, opts, classes, train)  # finished classes skipped, an interrupted one resumed
    if torchrun_env()[1] == 1:
        return train(cfg, opts, resume)
    return in_process_group(train, opts, cfg, opts, resume)


class Run:
    """One training run; a context manager that closes the log, restores the signal handlers and releases the lock.
    Under torchrun rank 0 alone writes to the run folder. batch_sampler: the steps' TrainSet keys (data.run_batches)."""

    def __init__(self, cfg, opts, resume, config_cls, batch_sampler=data.run_batches):
        self.cfg, self.opts, self.batch_sampler = cfg, opts, batch_sampler
        self.rank, self.world = rank_and_world()
        self.device, self.folder = pick_device(opts), run_folder(opts)
        self.ckpt_path, self.lock, self.log, self.handlers = self.folder / "ckpt.pt", None, None, {}
        self.step = self.saved_step = None
        self.state = resume_state(self.ckpt_path, resume, cfg, opts, config_cls)
        self.test, self.trainset, self.held_out, self.steps_per_epoch, self.aspects = training_data(cfg, opts, self.world)
        self.total = opts.max_steps if opts.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        if self.rank == 0:  # last: a check that fails above leaves no lock held
            self.lock = lock_run(self.folder)  # before anything is written into it
            write_config(self.folder, cfg, opts)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        for s, h in self.handlers.items():
            signal.signal(s, h)
        for f in [f for f in (self.log, self.lock) if f is not None]:
            f.close()
        if kind is not None and issubclass(kind, torch.cuda.OutOfMemoryError):
            last = f"step {self.saved_step}" if self.saved_step is not None else "none yet"
            raise SystemExit(f"CUDA out of memory at step {self.step + 1}: try a smaller --batch-size, --amp, or a "
                             f"smaller --img-size / --base-channels. Last checkpoint: {last}") from None

    def place(self, model):
        return model.to(self.device, memory_format=memory_format(self.opts, self.device))

    def start(self, model, opt):
        """Resume the optimizer, open the log, catch signals. Returns (first step, speed.training_forward)."""
        self.step, self.seconds0, self.model, self.opt = 0, 0.0, model, opt
        if self.state is not None:
            opt.load_state_dict(self.state["optimizer"])
            self.step = self.saved_step = self.state["step"]
            self.seconds0 = self.state.get("seconds", 0.0)
            print(f"resuming {self.folder} at step {self.step}/{self.total}")
        self.log = LossLog(self.folder / "log.csv", self.step, self.rank == 0)
        self.stop = Stop(self.opts.max_minutes, self.world, self.device)
        self.handlers = {s: signal.signal(s, self.stop.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self.step, training_forward(model, self.opts, self.device, self.world)

    def batches(self, step):
        """The TrainSet's batches from `step` to the end, in one DataLoader for the whole run."""
        cuda = self.device.type == "cuda"
        workers = self.opts.workers if self.opts.workers >= 0 else (min(8, (os.cpu_count() or 2) - 1) if cuda else 0)
        if self.rank == 0:
            describe(self, workers, step)
        self.t_start, self.step0 = time.time(), step
        self.t_print = self.t_start
        keys = self.batch_sampler(len(self.trainset), self.cfg.batch_size, self.cfg.seed, step, self.total, self.rank,
                            self.world)
        return torch.utils.data.DataLoader(self.trainset, batch_sampler=keys, num_workers=workers, pin_memory=cuda,
                                           worker_init_fn=ignore_sigint, prefetch_factor=4 if workers else None)

    def inputs(self, batch, step):
        """A batch's images, masks and anomaly-free images on the device, and the generator of this step's noise
        (resumable); random crops with --crop, the same window for an image and its clean one."""
        fmt = memory_format(self.opts, self.device)
        x0 = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        mask = batch["mask"].to(self.device, non_blocking=True)
        clean = batch["clean"].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * self.world + self.rank)
        return (*random_crops(x0, mask, self.opts.crop, g, clean), g) if self.opts.crop else (x0, mask, clean, g)

    def set_lr(self, opt, step, rates):
        """Each parameter group's rate at 0-based `step`: rates(lr_at(step), step). Returns the first."""
        lrs = rates(lr_at(step, self.cfg.lr, self.opts.lr_schedule, self.total), step)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        return opt.param_groups[0]["lr"]

    def after_step(self, step, loss, lr):
        """Log, checkpoint, stop. Returns True when training must end now (a signal or --max-minutes)."""
        now, self.step = time.time(), step
        self.log.add(step, loss, lr, self.seconds())
        halt = self.stop.now(step, self.total, self.seconds())
        save, keep = step % self.opts.ckpt_every == 0 or step == self.total or halt, step in self.opts.keep_ckpts
        if save or keep:
            self.log.flush(self.saved_step, self.ckpt_path)  # never a checkpoint of non-finite weights
            if self.rank == 0:
                for path in [self.ckpt_path] * save + [self.folder / f"ckpt_{step}.pt"] * keep:
                    self.checkpoint(path)
                self.saved_step = step if save else self.saved_step
        if now - self.t_print >= self.opts.log_every or step == self.total or step == self.step0 + 1 or halt:
            self.log.flush(self.saved_step, self.ckpt_path)
            self.t_print = now
            if self.rank == 0:
                self.log.progress(step, self.total, self.steps_per_epoch, (step - self.step0, now - self.t_start),
                                  self.cfg.batch_size * self.world)
        return halt

    def checkpoint(self, path, threshold=None):
        save_checkpoint(path, self.model, self.opt, self.step, self.cfg, self.opts, self.seconds(), threshold,
                        aspects=self.aspects)

    def seconds(self):
        return self.seconds0 + time.time() - self.t_start

    def end(self):
        """After the loop: an interrupted run exits saying how to resume; otherwise the training time is printed."""
        self.stop.exit_if_signalled(self.step, self.total, self.ckpt_path, self.rank == 0)
        self.train_seconds = self.seconds()
        if self.rank == 0:
            print(f"trained {self.step - self.step0} steps in {reports.duration(self.train_seconds)}"
                  + (f" (--max-minutes {self.opts.max_minutes} reached at step {self.step}/{self.total})"
                     if self.stop.time else "") + "; evaluating the final model")

    def write_metrics(self, res, threshold):
        """metrics.json of the final model: the evaluation (none without a test split), threshold, time and steps."""
        if self.test is None:
            print(f"{self.opts.data}: no test split (a plain folder without --test): the threshold only")
        res.update(threshold=threshold, train_seconds=round(self.train_seconds, 1), steps=self.step)
        reports.write_metrics(self.folder / "metrics.json", res, self.cfg, self.opts)
        if self.opts.compile:
            print("  " + compile_report() + " (training and evaluation)")


def resume_state(ckpt_path, resume, cfg, opts, config_cls):
    """The checkpoint to resume (None for a new run), checked against the settings asked for."""
    if not resume:
        if ckpt_path.exists():
            raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or --out for a new run")
        return None
    if not ckpt_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path} (train without --resume to start)")
    state, *saved = load_checkpoint(ckpt_path, config_cls)
    if "imported" in state:
        raise SystemExit(f"--resume: {ckpt_path} was imported from the authors' checkpoint and holds no optimizer "
                         "state; train a new run with --out")
    check_same_run(saved, (cfg, opts), ckpt_path)
    return state


def training_data(cfg, opts, world):
    """(test split or None, Alg. 1's TrainSet, the held-out slice or None, steps per epoch, the training images'
    (lowest, highest) width / height or None), every file checked."""
    splits = preflight(cfg, opts)
    normal, held_out = or_exit(holdout_split, splits["train"], opts.holdout)
    train = or_exit(trainset, normal, cfg, opts)
    steps_per_epoch = len(train) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{opts.data}: {len(train)} training images, fewer than one step's {cfg.batch_size * world} "
                         "(a batch takes distinct images); pass a smaller --batch-size")
    return splits.get("test"), train, held_out, steps_per_epoch, aspects(normal)  # aspects: for predict's note


def describe(run, workers, step):
    """The first lines of a training run: what trains on what, and the note before a slow CPU run."""
    held = f", {len(run.held_out)} held out for the threshold" if run.held_out is not None else ""
    ranks = f" per rank ({run.world} ranks: global batch {run.cfg.batch_size * run.world})" * (run.world > 1)
    print(f"training {run.opts.data} ({len(run.trainset)} normal images{held}) on {run.device}: "
          f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M parameters, {run.total} steps of "
          f"{run.cfg.batch_size} images{ranks}, {workers} loader workers, run folder {run.folder}")
    note = reports.cpu_note(run.model, run.cfg, run.opts, run.device, run.total - step)
    if note:
        print(note, flush=True)


class LossLog:
    """log.csv, one row per step (step, losses, lr, seconds). The losses stay on the device until a checkpoint or a
    progress line reads them back in bulk (no host sync per step); a non-finite one stops the run."""
    COLUMNS = ("total", "noise", "rec", "mask")

    def __init__(self, path, step, writes):
        self.path, self.pending, self.last, self.keys, self.file = path, [], {}, None, None
        if writes:  # resuming: the rows up to the checkpoint are kept
            kept = list(csv.reader(open(path)))[1:] if step else []
            self.file = open(path, "w", newline="")
            self.writer = csv.writer(self.file)
            self.writer.writerows([["step", "loss", "noise", "rec", "mask", "lr", "seconds"]]
                                  + [r for r in kept if int(r[0]) <= step])

    def add(self, step, loss, lr, seconds):
        self.keys = self.keys or [k for k in self.COLUMNS if k in loss]
        self.pending.append((step, torch.stack([loss[k].detach() for k in self.keys]), lr, seconds))

    def flush(self, saved_step, ckpt_path):
        """The pending losses to the host (one sync), a stop on a non-finite one, the rows to log.csv."""
        if not self.pending:
            return
        values = torch.stack([v for _, v, _, _ in self.pending]).float().cpu()
        for (step, _, lr, seconds), v in zip(self.pending, values.tolist()):
            if not math.isfinite(v[0]):
                where = (f"the last good checkpoint (step {saved_step}) is kept at {ckpt_path}"
                         if saved_step is not None else "no checkpoint was written yet")
                raise SystemExit(f"loss is {v[0]} at step {step}; stopped, {where}. Try a lower --lr or no --amp")
            if self.file is not None:
                row = dict(zip(self.keys, v))
                self.writer.writerow([step] + [f"{row[k]:.6f}" if math.isfinite(row.get(k, math.nan)) else ""
                                               for k in self.COLUMNS] + [f"{lr:.6g}", f"{seconds:.2f}"])
        self.pending.clear()
        self.last = dict(zip(self.keys, values[-1].tolist()))
        if self.file is not None:
            self.file.flush()  # log.csv holds every row up to the last checkpoint

    def progress(self, step, total, steps_per_epoch, done_in, images_per_step):
        """`step 120/900 (epoch 3) | total 0.41 noise 0.05 mask 0.36 | 9.2 img/s | eta 4m10s`; done_in: (steps, seconds)
        since this process started."""
        print(f"step {step}/{total} (epoch {(step - 1) // steps_per_epoch + 1}) | "
              + " ".join(f"{k} {v:.4f}" for k, v in self.last.items() if math.isfinite(v))
              + f" | {done_in[0] * images_per_step / max(done_in[1], 1e-9):.1f} img/s | "
              + reports.eta(done_in[0], done_in[0] + total - step, done_in[1]), flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()


class Stop:
    """When training ends early: Ctrl-C / SIGTERM (a second one kills at once; checkpoints are atomic) or
    --max-minutes. Under torchrun every rank stops at the same step (an all-reduce every 10 steps)."""

    def __init__(self, max_minutes, world, device):
        self.max_minutes, self.world, self.device, self.signal, self.time = max_minutes, world, device, 0, False

    def on_signal(self, signum, _):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)

    def now(self, step, total, seconds):
        if self.max_minutes and seconds >= 60 * self.max_minutes:
            self.time = True
        if self.world > 1 and (step % 10 == 0 or step == total):
            flags = torch.tensor([float(self.signal), float(self.time)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            self.signal, self.time = int(flags[0].item()) or self.signal, bool(flags[1].item())
        return bool(self.signal or self.time) and (self.world == 1 or step % 10 == 0 or step == total)

    def exit_if_signalled(self, step, total, ckpt_path, tell):
        """After a signal: exit 128 + its number, telling (rank 0) how to resume."""
        if self.signal:
            if tell:
                again = " ".join(sys.argv) + ("" if "--resume" in sys.argv else " --resume")
                print(f"interrupted at step {step}/{total}: the checkpoint of step {step} is at {ckpt_path}. Resume "
                      f"with:\n  {again}", file=sys.stderr)
            raise SystemExit(128 + self.signal)
