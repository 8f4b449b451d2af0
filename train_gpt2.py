"""Pretrain GPT-2 on pre-tokenized shards (see fineweb_edu.py).

    python train_gpt2.py --preset tiny                      # one device: CUDA, MPS or CPU
    torchrun --nproc-per-node=8 train_gpt2.py               # 8 GPUs, GPT-2 124M on FineWeb-Edu 10B

Every TrainConfig field is a flag (`--max-steps 100`); `--preset` picks the defaults they override.
A run lives in logs/<run-name>/: config.json, metrics.jsonl, log.txt and checkpoints. Re-running the same
command continues from the latest checkpoint (spot instances: SIGTERM saves one and exits cleanly).
"""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from gpt2.config import PRESET_DATA, TrainConfig, changed_settings, parse_config
from gpt2.curriculum import is_tied, model_config_at, seq_len_at, untie_head, untie_with_adamw, untied_at
from gpt2.dataloader import DataError, ShardLoader, bits_per_byte, gpt2_tokenizer, target_bytes, token_byte_lengths
from gpt2.ema import PowerEMA, remove_snapshots_after, save_snapshot
from gpt2.loss import fused_wanted
from gpt2.models import build_model
from gpt2.optim import build_optimizers, micro_steps, mtp_weights_at, set_schedule, window_at
from gpt2.runlog import Pace, RunLog
from gpt2.runs import (
    check_resume_config,
    check_resume_data,
    checkpoint_paths,
    data_identity,
    load_resume_checkpoint,
    open_run_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpt2.runtime import (DiskFullError, Dist, SecondSignal, StopRequest, autocast, autocast_dtype, exit_on_interrupt,
                          exit_once, is_disk_full, mfu_peak, setup_distributed)
from gpt2.sync import CheckpointSync
from model import GPT, LOSS_CHUNK_ELEMENTS

# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def val_loss(model, loader: ShardLoader, batches: int, dtype: torch.dtype, d: Dist) -> tuple[float, float]:
    """Mean val loss per token (nats) and bits per UTF-8 byte of the text the same targets encode, over all ranks."""
    model.eval()
    loader.reset()  # the same val tokens every time
    nats = torch.zeros((), device=d.device)
    n_bytes = torch.zeros((), device=d.device, dtype=torch.int64)  # int64: exact, where fp32 stops at 2^24
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast(d.device, dtype):
            nats += model(x, y, return_logits=False)[1].float() * y.numel()
        n_bytes += target_bytes(y)
    model.train()
    if d.world_size > 1:
        dist.all_reduce(nats)
        dist.all_reduce(n_bytes)
    tokens = batches * d.world_size * loader.B * loader.T
    return nats.item() / tokens, bits_per_byte(nats.item(), n_bytes.item())


@torch.no_grad()
def samples(raw_model: GPT, prompt: str, seed: int, device: torch.device, dtype: torch.dtype, count=4,
            tokens=32) -> list[str]:
    """A few continuations of a fixed prompt with a fixed seed (through the uncompiled module: the KV
    cache's changing shapes would make a compiled graph recompile every token)."""
    enc = gpt2_tokenizer()
    idx = torch.tensor([enc.encode(prompt)] * count, device=device)
    tokens = min(tokens, raw_model.config.block_size - idx.shape[1])
    gen = torch.Generator(device=device).manual_seed(seed)
    raw_model.eval()
    with autocast(device, dtype):
        out = raw_model.generate(idx, tokens, temperature=1.0, top_k=50, generator=gen)
    raw_model.train()
    return [enc.decode(row.tolist()) for row in out]


# ---------------------------------------------------------------------- what is due when (the resume rules)


@dataclass
class Cadence:
    """What is due at a step: evaluations, EMA snapshots, checkpoints, the end. The resume rules live here only.

    They guarantee that a resumed run performs exactly the evaluations, samples, snapshots and saves that the
    uninterrupted run would have, and that no step's evaluation runs twice:
    - a step's checkpoint is saved after its evaluations and says so ("evaluated"); a stop request skips the
      evaluations and saves at once, unevaluated. Resumed from it, the step is evaluated exactly when it was not.
    - the snapshot and checkpoint of the resumed step were saved by the process that stopped there: never again.
    - step 0 (the initial weights) is evaluated but never saved.
    """

    cfg: TrainConfig
    stop_step: int  # this process stops after this step: --stop-at, or --max-steps
    resumed_at: int = -1  # the step of the checkpoint this process started from; -1: none
    evaluated_at: int = -1  # a step whose evaluations already ran before its checkpoint; -1: none

    @classmethod
    def resuming(cls, cfg: TrainConfig, stop_step: int, ckpt: dict | None) -> "Cadence":
        if ckpt is None:
            return cls(cfg, stop_step)
        return cls(cfg, stop_step, resumed_at=ckpt["step"], evaluated_at=ckpt["step"] if ckpt["evaluated"] else -1)

    def last(self, step: int) -> bool:
        return step >= self.stop_step

    def evaluation_due(self, every: int, step: int, stopping: bool) -> bool:
        """val, HellaSwag and samples: every `every` steps (0: never) and at the last step."""
        return every > 0 and (step % every == 0 or self.last(step)) and step != self.evaluated_at and not stopping

    def snapshot_due(self, step: int) -> bool:
        every = self.cfg.ema_snapshot_every
        return bool(every) and step % every == 0 and self._unsaved(step)

    def checkpoint_due(self, step: int, stopping: bool) -> bool:
        every = self.cfg.checkpoint_every
        return self._unsaved(step) and ((bool(every) and step % every == 0) or self.last(step) or stopping)

    def _unsaved(self, step: int) -> bool:
        return step > max(self.resumed_at, 0)


# ---------------------------------------------------------------------- set-up


def accumulation_and_stop(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """Micro-steps per optimizer step, and the step this process stops after."""
    tokens_per_micro = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro:
        raise SystemExit(f"--total-batch-size {cfg.total_batch_size} is not divisible by batch_size * seq_len * "
                         f"world_size = {cfg.batch_size} * {cfg.seq_len} * {world_size}: change one of them")
    if cfg.stop_at > cfg.max_steps:
        raise SystemExit(f"--stop-at {cfg.stop_at} is past --max-steps {cfg.max_steps}, where the schedule ends")
    accum = cfg.total_batch_size // tokens_per_micro
    if cfg.batch_ramp_start and not (0 < cfg.batch_ramp_start < 1 and accum > 1):
        raise SystemExit(f"--batch-ramp-start {cfg.batch_ramp_start} needs to be in (0, 1) and more than one "
                         f"micro-batch per step (now {accum}): lower --batch-size")
    if cfg.window_start and not 0 < cfg.window_start < cfg.model.window:
        raise SystemExit(f"--window-start {cfg.window_start} needs --window above it (now {cfg.model.window})")
    return accum, cfg.stop_at or cfg.max_steps


def open_data(cfg: TrainConfig, d: Dist, preset: str) -> tuple[ShardLoader, ShardLoader, int]:
    """The train and val loaders, and how many val batches an evaluation reads. Fails on missing or broken
    data before any other work."""
    try:
        train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, d.rank, d.world_size, d.device,
                                   align_docs=cfg.align_docs, shuffle=cfg.shuffle, seed=cfg.seed)
        val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, cfg.seq_len, d.rank, d.world_size, d.device)
    except (DataError, ValueError) as e:
        hint = (f"\nthe {preset} preset's data (as in README.md): `{PRESET_DATA[preset]} --out {cfg.data_dir}`"
                if preset in PRESET_DATA and not os.path.isfile(cfg.data_dir) else "")  # a file: e says what to do
        raise SystemExit(f"{e}{hint}") from None
    # the same first val tokens every time, never more than the val split holds (no wrap-around repeats)
    tokens_per_micro = cfg.batch_size * cfg.seq_len * d.world_size
    val_windows = sum((size - 1) // tokens_per_micro for size in val_loader.sizes)
    val_batches = max(1, min(cfg.val_tokens // tokens_per_micro, val_windows))
    return train_loader, val_loader, val_batches


def load_hellaswag(cfg: TrainConfig) -> list[dict]:
    if not cfg.hellaswag_every:
        return []
    try:
        return hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit or None)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"HellaSwag data: {e} (or turn the eval off with --hellaswag-every 0)") from None


def open_run(cfg: TrainConfig, preset: str, d: Dist, data_id: str):
    """The run's folder, lock (rank 0) and log, and the checkpoint to resume from (its settings and data checked
    against cfg), if any. metrics.jsonl keeps no record past that checkpoint's step: those steps run again."""
    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    lock = open_run_dir(cfg, run_dir, d.master)
    resume_path, ckpt = load_resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_resume_config(cfg, ckpt["config"], resume_path)
        check_resume_data(ckpt, data_id, resume_path, cfg.data_dir)
    log = RunLog(run_dir, d.master, resumed_at=ckpt["step"] if ckpt is not None else None)
    if d.master:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"preset": preset, **dataclasses.asdict(cfg)}, f, indent=2)
    return run_dir, lock, log, resume_path, ckpt


def build_emas(cfg: TrainConfig, model: GPT) -> list[PowerEMA]:
    """The EMA that is evaluated, and with snapshots a second of half its width: post-hoc fits of other widths
    are ~20x closer from two widths than from one (ema.py)."""
    widths = [cfg.ema_sigma_rel] if cfg.ema_sigma_rel else []
    if cfg.ema_snapshot_every:
        widths.append(cfg.ema_sigma_rel / 2)
    params = list(model.parameters())
    return [PowerEMA(params, width) for width in widths]


# ---------------------------------------------------------------------- the loop


@dataclass
class StepStats:
    loss: float  # mean over the step's micro-batches and ranks
    grad_norm: float  # before clipping
    lr_multiplier: float
    seconds: float
    stop: bool  # a stop request, agreed on by all ranks
    tokens: int  # trained on in this step, all ranks


class Trainer:
    """One process of a run: its data, model, optimizers, EMAs and log, and the step it is at (0, or the resumed
    checkpoint's). train() below drives it one phase at a time."""

    def __init__(self, cfg: TrainConfig, preset: str):
        self.cfg = cfg
        d = self.d = setup_distributed(cfg.device)
        self.grad_accum, stop_step = accumulation_and_stop(cfg, d.world_size)
        micro_tokens = cfg.total_batch_size // self.grad_accum  # the batch ramp varies a step's micro-batches
        self.tokens_before = list(itertools.accumulate(
            (micro_tokens * micro_steps(cfg, s, self.grad_accum) for s in range(cfg.max_steps)), initial=0))
        self.train_loader, self.val_loader, self.val_batches = open_data(cfg, d, preset)
        self.hellaswag_examples = load_hellaswag(cfg)
        if cfg.val_every or cfg.hellaswag_every or cfg.sample_every:
            token_byte_lengths()  # the tokenizer (for bits per byte, HellaSwag, samples), before any run folder
        self.data_id = data_identity(cfg.data_dir)
        self.run_dir, self.lock, self.log, resume_path, ckpt = open_run(cfg, preset, d, self.data_id)
        self.sync = CheckpointSync(cfg.checkpoint_sync, self.run_dir, cfg.run_name, self.log.print)
        device_type = d.device.type
        self.dtype = autocast_dtype(cfg.dtype, d.device)
        use_compile = device_type == "cuda" if cfg.compile == "auto" else cfg.compile == "1"
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(cfg.seed)
        chunked = cfg.chunked_loss == "1" or (cfg.chunked_loss == "auto" and device_type != "cuda")
        loss_path = "chunked" if chunked else "fused (Liger)" if fused_wanted(device_type) else "full-logits"
        raw_model = build_model(cfg.model, loss_chunk_elements=LOSS_CHUNK_ELEMENTS if chunked else 0).to(d.device)
        self.raw_model = raw_model
        if ckpt is not None and untied_at(cfg, ckpt["step"]):  # saved after --untie-at's step: with the untied head
            untie_head(raw_model)
        self.optimizers = build_optimizers(cfg, raw_model, device_type)
        self.emas = build_emas(cfg, raw_model)
        self.step, self.elapsed_before = 0, 0.0
        if ckpt is not None:
            self.restore(ckpt, resume_path, stop_step)
        self.cadence = Cadence.resuming(cfg, stop_step, ckpt)
        # val loss runs compiled too; HellaSwag and sampling call hidden()/generate(), which run eagerly
        dynamic = False if cfg.seq_len_start else None  # each row length a graph of its own: a few (gpt2/curriculum.py)
        self.model = torch.compile(raw_model, dynamic=dynamic) if use_compile else raw_model
        ddp_ids = [d.local_rank] if device_type == "cuda" else None
        self.train_model = DDP(self.model, device_ids=ddp_ids) if d.world_size > 1 else self.model

        self.flops_per_token, self.peak = raw_model.flops_per_token(cfg.seq_len), mfu_peak(d.device, self.dtype)
        self.log.print(f"config: {changed_settings(cfg, preset)} (all of it: {self.run_dir}/config.json)")
        self.log.print(f"{raw_model.num_params():,} parameters | {d.world_size} x {d.device} | {self.dtype} | "
                       f"compile {use_compile} | {loss_path} loss | grad accumulation {self.grad_accum} | "
                       f"{self.val_batches} val batches")
        self.result = {}  # the latest val loss (and EMA val loss), HellaSwag acc_norm and train loss
        self.stop = StopRequest()
        self.pace = Pace()  # the step time the log's ETA assumes
        self.t_start = time.time()

    def restore(self, ckpt: dict, path: str, stop_step: int):
        """Weights, optimizer states, EMAs, the loader's position, the RNGs and the clock of a checkpoint."""
        self.raw_model.load_state_dict(ckpt["model"])
        try:
            for opt, state in zip(self.optimizers, ckpt["optimizers"], strict=True):
                opt.load_state_dict(state)
        except ValueError as e:  # the optimizers' parameter groups are not the ones it was saved with
            raise SystemExit(f"{path}: its optimizer state does not fit this code's optimizers ({e}): the parameters' "
                             "split between the optimizers changed since it was saved; resume it with the code that "
                             "wrote it, or start over with --resume never") from None
        self.train_loader.load_state_dict(ckpt["loader"])
        for ema, state in zip(self.emas, ckpt.get("emas", []), strict=True):
            ema.load_state_dict(state)
        remove_snapshots_after(self.run_dir, ckpt["step"])
        set_rng_state(ckpt["rng"])
        self.step, self.elapsed_before = ckpt["step"], ckpt["elapsed"]
        self.log.print(f"resumed from {path} at step {self.step}")
        if self.step >= stop_step:
            self.log.print(f"the run in {self.run_dir} is already at step {self.step} (--stop-at/--max-steps "
                           f"{stop_step}): nothing to train; continue with a later --stop-at, or start another run "
                           "with --run-name NAME")

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def tokens(self) -> int:
        """Tokens trained on before the current step, over all ranks."""
        return self.tokens_before[self.step]

    def event(self, kind: str, **values):
        self.log.event(kind, self.step, self.tokens(), self.elapsed(), **values)

    def follow_schedules(self):
        """The window schedule's window for this step, before its evaluations and its training (so a resumed run
        evaluates with the window the uninterrupted run had); and multi-token prediction's loss weights."""
        if self.cfg.window_start:
            self.raw_model.set_window(window_at(self.cfg, self.step))
        if self.cfg.model.mtp:  # --mtp: this step's weights of the later tokens' losses (the logged loss is next-token)
            self.raw_model.set_mtp_weights(mtp_weights_at(self.cfg, self.step))

    def follow_curriculum(self):
        """The step's row length and model config (gpt2/curriculum.py), and at --untie-at's step the head untied,
        with AdamW and DDP rebuilt around it; before the step's evaluations, like follow_schedules."""
        cfg, d, raw_model = self.cfg, self.d, self.raw_model
        if cfg.seq_len_start:
            self.train_loader.set_row_len(seq_len_at(cfg, self.step))
            self.flops_per_token = raw_model.flops_per_token(seq_len_at(cfg, self.step))  # shorter rows' attention
        if untied_at(cfg, self.step) and is_tied(raw_model):
            self.optimizers[0] = untie_with_adamw(cfg, raw_model, self.optimizers[0], d.device.type)
            if d.world_size > 1:  # DDP reduces the gradients of the parameters it was built with: the head's too
                del self.train_model
                self.train_model = DDP(self.model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        if (config := model_config_at(cfg, self.step)) != raw_model.config:  # unchanged: no new guard for compile
            raw_model.config = config

    def evaluate_if_due(self, stopping: bool):
        """val loss (and the EMA's), HellaSwag and samples, each on its own cadence."""
        cfg, d, step, due, result = self.cfg, self.d, self.step, self.cadence, self.result
        if due.evaluation_due(cfg.val_every, step, stopping):
            result["val_loss"], bpb = val_loss(self.model, self.val_loader, self.val_batches, self.dtype, d)
            self.event("val", loss=result["val_loss"], bpb=bpb)
            self.log.print(f"step {step:6d} | val loss {result['val_loss']:.4f} | bpb {bpb:.4f}")
            if self.emas and step > 0:
                with self.emas[0].swapped_in():
                    result["val_loss_ema"], bpb = val_loss(self.model, self.val_loader, self.val_batches, self.dtype, d)
                self.event("val_ema", loss=result["val_loss_ema"], bpb=bpb, sigma_rel=cfg.ema_sigma_rel)
                self.log.print(f"step {step:6d} | EMA val loss {result['val_loss_ema']:.4f} | bpb {bpb:.4f} "
                               f"(sigma_rel {cfg.ema_sigma_rel})")
        if due.evaluation_due(cfg.hellaswag_every, step, stopping):
            hs = hellaswag.evaluate(self.model, self.hellaswag_examples, d.device, rank=d.rank, world_size=d.world_size,
                                    dtype=self.dtype, progress=True)
            result["hellaswag"] = hs["acc_norm"]
            self.event("hellaswag", acc=hs["acc"], acc_norm=hs["acc_norm"], count=hs["count"])
            self.log.print(f"step {step:6d} | hellaswag acc_norm {hs['acc_norm']:.4f} ({hs['count']} examples)")
        if due.evaluation_due(cfg.sample_every, step, stopping) and d.master:
            texts = samples(self.raw_model, cfg.sample_prompt, cfg.seed, d.device, self.dtype)
            self.event("sample", samples=texts)
            self.log.print("\n".join(f"sample: {t!r}" for t in texts))

    def save_if_due(self, stopping: bool):
        """The EMA snapshot and the checkpoint of this step, each when due."""
        cfg, d = self.cfg, self.d
        if self.emas and self.cadence.snapshot_due(self.step) and d.master:
            names = [name for name, _ in self.raw_model.named_parameters()]
            config = dataclasses.asdict(self.raw_model.config)
            self.log.print(f"saved {save_snapshot(self.run_dir, self.emas, names, config)}")
        if self.cadence.checkpoint_due(self.step, stopping):
            if d.master:
                state = {"model": self.raw_model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                         "step": self.step, "loader": self.train_loader.state_dict(), "rng": rng_state(),
                         "elapsed": self.elapsed(), "evaluated": not stopping,  # see Cadence
                         "emas": [e.state_dict() for e in self.emas], "config": dataclasses.asdict(cfg),
                         "model_config": dataclasses.asdict(self.raw_model.config),  # as at this step (curriculum)
                         "data_identity": self.data_id}
                path = save_checkpoint(self.run_dir, state, cfg.keep_checkpoints)
                self.log.print(f"saved {path}")
                self.sync.after_checkpoint(path)  # in the background: --checkpoint-sync's copy off the box
            if d.world_size > 1:
                dist.barrier()

    def optimizer_step(self) -> StepStats:
        """The step's micro-steps (grad_accum, fewer early in a batch ramp) with the gradients all-reduced on the
        last one only, then every optimizer's step."""
        cfg, d, accum = self.cfg, self.d, micro_steps(self.cfg, self.step, self.grad_accum)
        t0 = time.time()
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = self.train_loader.next_batch()
            sync = contextlib.nullcontext() if micro == accum - 1 or d.world_size == 1 else self.train_model.no_sync()
            with sync:
                with autocast(d.device, self.dtype):
                    _, loss = self.train_model(x, y, return_logits=False)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip or math.inf)  # 0: no clip
        # One all-reduce carries the loss and the stop requests: all ranks stop after the same step. The signal
        # handler's flag is only ever read here, never reset, so a signal arriving meanwhile counts next step.
        stats = torch.stack([loss_sum / accum, torch.tensor(float(self.stop.requested), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        train_loss, stop = stats[0].item() / d.world_size, bool(stats[1].item())
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm.item())):
            raise SystemExit(f"step {self.step}: loss {train_loss}, grad norm {grad_norm.item()} is not finite; "
                             f"stopping without saving, so the checkpoints in {self.run_dir} are untouched. "
                             f"Resuming would repeat this exactly: start a new run (--run-name NAME) with a lower "
                             f"--max-lr, or check the data.")
        multiplier = set_schedule(cfg, self.optimizers, self.step, accum / self.grad_accum)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.raw_model.after_step()  # edm2 / hypersphere: weights back on their spheres; experts: routing biases
        tokens_after = self.tokens_before[self.step + 1]
        for ema in self.emas:  # the EMA's time is tokens: a step of a batch ramp weighs what it trained on
            ema.update(self.step + 1, tokens_after, tokens_after - self.tokens())
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        return StepStats(train_loss, grad_norm.item(), multiplier, time.time() - t0, stop, tokens_after - self.tokens())

    def log_step(self, s: StepStats):
        cfg, d = self.cfg, self.d
        lr = cfg.max_lr * s.lr_multiplier  # AdamW's lr, as logged since the first runs
        tok_per_s = s.tokens / s.seconds
        mfu = self.flops_per_token * tok_per_s / (self.peak * d.world_size) if self.peak else None
        mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
        self.result["train_loss"] = s.loss
        schedules = {"batch_tokens": s.tokens} if cfg.batch_ramp_start else {}
        schedules |= {"window": window_at(cfg, self.step - 1)} if cfg.window_start else {}
        schedules |= {"seq_len": seq_len_at(cfg, self.step - 1)} if cfg.seq_len_start else {}
        loads = self.raw_model.moe_loads() if hasattr(self.raw_model, "moe_loads") else None
        schedules |= {"moe_loads": loads} if loads is not None else {}  # per layer, each expert's token fraction
        used = self.train_loader.data_used  # the share of the train tokens read so far that were targets
        self.event("train", loss=s.loss, lr=lr, grad_norm=s.grad_norm, dt_ms=s.seconds * 1000, tok_per_s=tok_per_s,
                   mfu=mfu, mem_gb=mem, data_used=used, **schedules)
        self.pace.update(s.seconds)
        fields = (f"loss {s.loss:.6f} | lr {lr:.2e} | norm {s.grad_norm:.3f} | {s.seconds * 1000:.0f} ms | "
                  f"{tok_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "")
                  + (f" | {mem:.1f} GiB" if mem else "") + f" | data used {used:.1%}")
        self.log.print(self.pace.line(self.step, self.cadence.stop_step, self.tokens(), self.elapsed(), fields))

    def summary(self, stopping: bool, resumed_at: int) -> str | None:
        """The run's last line: where a stopped run resumes, or what a finished one reached."""
        if stopping:
            return f"stopped at step {self.step} (checkpoint in {self.run_dir}): run the same command to resume"
        if self.step == resumed_at:
            return None
        val = f"val loss {self.result['val_loss']:.4f}, " if "val_loss" in self.result else ""
        ckpts = checkpoint_paths(self.run_dir)
        return (f"finished: step {self.step}, {val}{self.tokens():,} tokens, "
                f"{self.elapsed() / 60:.1f} min of training; checkpoint {ckpts[-1] if ckpts else 'none'}")

    def ending(self, e: BaseException) -> BaseException:
        """What the run ends with on e, its one line kept in log.txt and metrics.jsonl (kind "error") first: for what
        the user can act on, a SystemExit with the message (no traceback); else e itself, traceback and all."""
        if isinstance(e, DataError):  # damage that only shows when a shard is first read, e.g. ids past the vocabulary
            message = f"{e}\nstopping without saving: the checkpoints in {self.run_dir} are untouched"
        elif is_disk_full(e):  # torch's 'unexpected pos' on closing a checkpoint, or a log write
            full = e.strerror if isinstance(e, DiskFullError) else f"no space left on the disk of {self.run_dir}"
            message = (f"{full}; the checkpoints already in {self.run_dir} are intact (the same command resumes from "
                       "the latest one)")
        elif isinstance(e, SecondSignal):
            ckpts = checkpoint_paths(self.run_dir)
            message = (f"second {e}: stopping now without a checkpoint; the last checkpoint is "
                       f"{ckpts[-1] if ckpts else 'none'} (the same command resumes from it)")
        elif isinstance(e, SystemExit) and isinstance(e.code, str):  # the run's own messages, e.g. a NaN loss
            message = e.code
        else:
            self.log.error(self.step, self.tokens(), self.elapsed(), f"{type(e).__name__}: {e}".removesuffix(": "))
            return e
        return self.log.error(self.step, self.tokens(), self.elapsed(), message)

    def teardown(self):
        self.sync.close()  # the last checkpoint off the box before the process ends (bounded wait)
        if self.lock:
            self.lock.release()
        if self.d.world_size > 1:
            del self.train_model  # DDP's reducer before the process group it uses (the other order can abort at exit)
            dist.destroy_process_group()


def train(cfg: TrainConfig, preset: str) -> dict:
    try:
        trainer = Trainer(cfg, preset)
    except OSError as e:  # a full disk shows first in the run folder's small files: lock, config.json, log.txt
        if not is_disk_full(e):
            raise
        raise SystemExit(f"no space left on the disk of {os.path.join(cfg.log_dir, cfg.run_name)} ({e.strerror}): "
                         "free some space and run the same command again") from None
    resumed_at = trainer.step
    stopping = False  # a stop request all ranks have agreed on (through the per-step all-reduce)
    try:
        while True:
            stopping = stopping or (trainer.d.world_size == 1 and trainer.stop.requested)
            trainer.follow_schedules()
            trainer.follow_curriculum()
            trainer.evaluate_if_due(stopping)
            trainer.save_if_due(stopping)
            if trainer.cadence.last(trainer.step) or stopping:
                break
            stats = trainer.optimizer_step()
            trainer.step += 1
            trainer.log_step(stats)
            stopping = stats.stop
    except BaseException as e:  # every end but the planned one leaves its line in the run's logs
        if (end := trainer.ending(e)) is e:
            raise
        raise end from None
    finally:
        trainer.stop.restore()  # also after an error: the caller's handlers come back
    if summary := trainer.summary(stopping, resumed_at):
        trainer.log.print(summary)
    trainer.teardown()
    return {"step": trainer.step, **trainer.result}


def main(argv=None) -> dict:
    cfg, preset = parse_config(argv, description=__doc__)
    return train(cfg, preset)


def cli():
    """main() as a script: a message that stops the run is printed once, not once per torchrun rank; Ctrl-C outside
    the training loop exits at once, without a traceback."""
    exit_on_interrupt()
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            raise SystemExit(exit_once(e.code)) from None
        raise


if __name__ == "__main__":
    cli()
