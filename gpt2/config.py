"""The run's configuration: TrainConfig (every field a flag, its trailing comment the flag's help), the presets,
and parse_config, the command line that builds a TrainConfig and refuses flags that do not go together."""

import argparse
import dataclasses
import functools
import inspect
import io
import re
import tokenize
from dataclasses import dataclass, field

from gpt2.dataloader import ALIGN_MODES
from gpt2.runtime import OneLineParser
from gpt2.sync import command_problem
from model import ARCH_CHOICES, GPTConfig


def choice(*values: str, legacy: dict | None = None):
    """A field that takes one of values, the first being its default: argparse and TrainConfig both check it.
    legacy: the values it took in older versions (their command lines, configs and checkpoints) -> today's."""
    return field(default=values[0], metadata={"choices": values, "legacy": legacy or {}})


@dataclass
class TrainConfig:
    # data and run
    data_dir: str = "data/fineweb_edu"  # the token shards and their manifest.json (fineweb_edu.py --out)
    log_dir: str = "logs"  # a run lives in log_dir/run_name/
    run_name: str = ""  # default: the preset's name
    resume: str = "auto"  # auto: latest checkpoint of this run if any | never | path/to/ckpt.pt
    # train rows start at a document's <|endoftext|> (gpt2/packing.py); crop: the rest of a row's last document is
    # dropped (on long documents most tokens); pack: best-fit packing puts it in a later row, almost nothing dropped;
    # 1 (when it was a switch) = crop
    align_docs: str = choice(*ALIGN_MODES, legacy={False: "0", True: "crop", "1": "crop"})
    shuffle: bool = False  # train shards and windows in a seeded random order per epoch
    # the model: every GPTConfig field (model.py) but two is a flag too (--n-layer 4, --norm rmsnorm, ...):
    # block_size = seq_len, and vocab_size is GPT-2's, padded 50257 -> 50304 rows for faster matmuls (padded ids
    # are never predicted)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_multiple=128))
    # batch: total_batch_size tokens per optimizer step = batch_size * seq_len * world_size * accumulation
    batch_size: int = 64  # sequences per micro-batch and process: lower it when out of memory
    seq_len: int = 1024  # tokens per sequence (the model's block_size)
    total_batch_size: int = 524_288  # tokens per optimizer step: a multiple of batch_size * seq_len * processes
    # optimizer and schedule (GPT-3 small hyper-parameters)
    max_lr: float = 6e-4  # AdamW's peak lr, reached after the warm-up
    min_lr_ratio: float = 0.1  # the schedule ends at max_lr * min_lr_ratio at max_steps
    schedule: str = choice("cosine", "wsd", "invsqrt")  # wsd: warm-up, stable, decay; invsqrt: EDM2's (see lr_at)
    decay_frac: float = 0.2  # wsd: the last fraction of the steps, over which the lr decays linearly
    decay_ref_steps: int = 100  # invsqrt: the lr is 1 / sqrt(max(step / decay_ref_steps, 1)) of its peak
    warmup_steps: int = 715  # steps of linear lr warm-up; 0: none
    max_steps: int = 19_073  # 10B tokens / 524,288 per step: one epoch of FineWeb-Edu sample-10BT
    stop_at: int = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0: at max_steps
    # the speedruns' growing batch and window (0: off), functions of the step, so a resumed run follows them exactly
    batch_ramp_start: float = 0.0  # > 0: a step's tokens rise from this share of total_batch_size; lrs x sqrt(share)
    batch_ramp_frac: float = 0.25  # ... to all of it, linearly over this fraction of max_steps (whole micro-batches)
    window_start: int = 0  # > 0: the windowed layers' window rises from this to --window, in multiples of this
    window_ramp_frac: float = 1.0  # ... linearly over this fraction of max_steps
    # the speedruns' growing rows and late untied head (gpt2/curriculum.py; 0 / none: off), functions of the step too
    seq_len_start: int = 0  # > 0: rows start this long and double up to --seq-len; a micro-batch keeps its tokens
    seq_len_ramp_frac: float = 0.333  # ... in equal stages over this fraction of max_steps (modded-nanogpt's 896: 1/3)
    # YaRN (--rope-scaling yarn) counted over the first rows (seq-len) or windows (window) of their schedule, extended
    # by the step's over them: each growth rescales RoPE (modded-nanogpt); it sets rope_original_context and rope_factor
    yarn_follows: str = choice("none", "seq-len", "window")
    untie_at: float = 0.0  # > 0: at this share of max_steps the tied head becomes a matrix of its own (a table copy)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (matrices and embeddings only)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # clip the gradients' global norm to this; 0: no clipping
    optimizer: str = choice("adamw", "muon")  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak lr; the schedule scales it like max_lr
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum
    muon_fixed_norm: bool = False  # MuonH: after each step, scale every Muon matrix back to its initial norm
    muon_split: bool = False  # orthogonalize attention's q, k, v (and SwiGLU's gate, up) as matrices of their own
    muon_ns: str = choice("ns5", "polar")  # ns5: Newton-Schulz quintic; polar: Polar Express (per-step coefficients)
    muon_weight_decay: float = 0.0  # decoupled, times Muon's (scheduled, shape-scaled) lr; 0: none
    muon_cautious_wd: bool = False  # decay only the entries where the update and the weight have the same sign
    muon_normuon: bool = False  # NorMuon: per-row second-moment normalization of the orthogonalized update
    muon_beta2: float = 0.95  # NorMuon's second-moment EMA (nanochat 0.95, modded-nanogpt 0.9)
    muon_manifold: str = choice("none", "stiefel")  # stiefel: manifold Muon, every Muon matrix (block) semi-orthogonal
    muon_manifold_iters: int = 10  # stiefel's dual-ascent steps; 0: cheap: tangent-projected momentum, msign, retract
    # AdamW's settings per parameter role (gpt2/optim.py param_roles; Muon's matrices stay Muon's), each scaled by
    # the schedule like max_lr. Unset (lr, beta1, beta2 0; wd -1): the parent role's (value_embed: embed, x0:
    # scalar), else --max-lr, --beta1, --beta2 and GPT-2's decay (--weight-decay on tables and matrices, 0 on 1-D
    # parameters). The anchors' values (nanochat, modded-nanogpt): README "Per-role learning rates"
    adam_embed_lr: float = 0.0  # peak lr of the token (untied) and position tables (0: --max-lr)
    adam_embed_beta1: float = 0.0  # ... their Adam beta1 (0: --beta1)
    adam_embed_beta2: float = 0.0  # ... their Adam beta2 (0: --beta2)
    adam_embed_wd: float = -1.0  # ... their weight decay (-1: GPT-2's)
    adam_head_lr: float = 0.0  # peak lr of the LM head (tied: of the shared table; 0: --max-lr)
    adam_head_beta1: float = 0.0  # ... its Adam beta1 (0: --beta1)
    adam_head_beta2: float = 0.0  # ... its Adam beta2 (0: --beta2)
    adam_head_wd: float = -1.0  # ... its weight decay (-1: GPT-2's)
    adam_value_embed_lr: float = 0.0  # peak lr of the value-embedding tables (0: the embed role's, else --max-lr)
    adam_value_embed_beta1: float = 0.0  # ... their Adam beta1 (0: the embed role's, else --beta1)
    adam_value_embed_beta2: float = 0.0  # ... their Adam beta2 (0: the embed role's, else --beta2)
    adam_value_embed_wd: float = -1.0  # ... their weight decay (-1: the embed role's, else GPT-2's)
    adam_scalar_lr: float = 0.0  # peak lr of the 1-D parameters: biases, norm gains, sinks, lambdas (0: --max-lr)
    adam_scalar_beta1: float = 0.0  # ... their Adam beta1 (0: --beta1)
    adam_scalar_beta2: float = 0.0  # ... their Adam beta2 (0: --beta2)
    adam_scalar_wd: float = -1.0  # ... their weight decay (-1: GPT-2's)
    adam_x0_lr: float = 0.0  # peak lr of x0_mix's x0 lambdas (0: the scalar role's, else --max-lr)
    adam_x0_beta1: float = 0.0  # ... their Adam beta1 (0: the scalar role's, else --beta1)
    adam_x0_beta2: float = 0.0  # ... their Adam beta2 (0: the scalar role's, else --beta2)
    adam_x0_wd: float = -1.0  # ... their weight decay (-1: the scalar role's, else GPT-2's)
    adam_gate_lr: float = 0.0  # peak lr of the gates AdamW holds (ve_gate, modules tagged "gate"; 0: --max-lr)
    adam_gate_beta1: float = 0.0  # ... their Adam beta1 (0: --beta1)
    adam_gate_beta2: float = 0.0  # ... their Adam beta2 (0: --beta2)
    adam_gate_wd: float = -1.0  # ... their weight decay (-1: GPT-2's)
    adam_width_scale: bool = False  # embed, head and value_embed lrs x (n_embd / 768) ** -0.5 (nanochat dmodel scale)
    ema_sigma_rel: float = 0.0  # > 0: also keep EDM2's power-function EMA of the weights (0.05-0.1) and evaluate it
    ema_snapshot_every: int = 0  # > 0: save the EMA (and one of half its width) to logs/<run>/ema/ this often (ema.py)
    # evaluation, sampling and checkpoints (0 disables; each also runs at the last step)
    val_every: int = 250  # steps between val-loss evaluations (0: never; also at the last step)
    val_tokens: int = 10_485_760  # the same first val tokens every time
    hellaswag_every: int = 250  # steps between HellaSwag evaluations (0: never; also at the last step)
    hellaswag_data: str = "val"  # split to download, or a local .jsonl
    hellaswag_limit: int = 0  # 0: all 10,042 examples
    sample_every: int = 1000  # steps between printed samples (0: never; also at the last step)
    sample_prompt: str = "Hello, I'm a language model,"  # the samples' prompt
    checkpoint_every: int = 1000  # steps between checkpoints (0: at the end and on a stop request only)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, older ones deleted; 0: keep all
    # checkpoints off the box (spot instances), e.g. "rsync -a {dir}/ backup-host:runs/{run}/": rank 0 runs it after
    # each checkpoint, one at a time, output in <run>/sync.log; the run's end waits for it (gpt2/sync.py)
    checkpoint_sync: str = ""  # shell command run after each checkpoint, in background; {dir} {run} {ckpt} filled in
    # system
    device: str = "auto"  # auto: cuda > mps > cpu
    dtype: str = choice("auto", "float32", "bfloat16")  # autocast: auto = bfloat16 on CUDA, else float32
    compile: str = choice("auto", "0", "1")  # torch.compile: auto = on for CUDA
    chunked_loss: str = choice("auto", "0", "1")  # auto = on except on CUDA (see BENCHMARKS.md)
    seed: int = 1337  # seeds the initial weights, the --shuffle order and the samples

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                setattr(self, f.name, current_value(f.name, getattr(self, f.name)))
                if getattr(self, f.name) not in f.metadata["choices"]:
                    raise ValueError(f"{f.name} must be one of {f.metadata['choices']}, got {getattr(self, f.name)!r}")


TINY = dict(
    data_dir="data/fineweb_edu_tiny", n_layer=4, n_head=4, n_embd=128, batch_size=16, seq_len=128,
    total_batch_size=2048, max_lr=3e-3, warmup_steps=20, max_steps=300, val_every=50, val_tokens=65_536,
    hellaswag_every=0, sample_every=100, checkpoint_every=100,
)
# The switches that won their single-switch ablation on the tiny CPU setup by more than two seeds of the baseline
# differ (BENCHMARKS.md, "Ablations"), plus Muon and the wsd schedule (the "modern" suite) and Muon's q, k, v
# orthogonalized apart (the one option of the "muon" suite that won beyond its seed spread).
MODERN = dict(optimizer="muon", schedule="wsd", pos="rope", tie_head=False, n_kv_head=2, sinks=True, muon_split=True)
# The speedruns' switches that won the "speedrun" suite on top of the modern preset (BENCHMARKS.md, "speedrun"),
# and of the 2025-26 records' the one that won the "speedrun2026" suite on both corpora: the head tied to the
# table, then untied at 2/3 of the steps as modded-nanogpt does (BENCHMARKS.md, "Session 7").
SPEEDRUN = dict(MODERN, doc_mask=True, align_docs="pack", value_embeds=True, unet=True, tie_head=True, untie_at=0.667)
# The roadmap's winners at their best lr on tiny's own 300 steps (the `presets` suite's sweep, BENCHMARKS.md
# "Session 8": half the 150-step `tuned` sweep's); at 124M each as its paper scales (README)
EDM2 = dict(mode="edm2", max_lr=4.8e-2)  # 4x EDM2-XS's lr at the same width (128)
HYPERSPHERE = dict(mode="hypersphere", max_lr=1.2e-2)  # 8x nGPT's 1.5e-3
MANIFOLD = dict(optimizer="muon", muon_manifold="stiefel", muon_lr=0.03)
# EDM2's lr goes as 1 / sqrt(width): from the tiny model's to GPT-2's
EDM2_124M = dict(EDM2, max_lr=round(EDM2["max_lr"] * (TINY["n_embd"] / GPTConfig.n_embd) ** 0.5, 4))
HYPERSPHERE_124M = dict(HYPERSPHERE, max_lr=2e-3)  # nGPT has no width rule: its own best near 0.5B, 19k steps
PRESETS = {
    "gpt2-124m": {},
    "gpt2-124m-modern": MODERN,
    "gpt2-124m-speedrun": SPEEDRUN,
    "gpt2-124m-edm2": EDM2_124M,
    "gpt2-124m-hypersphere": HYPERSPHERE_124M,
    "gpt2-124m-manifold": MANIFOLD,
    "tiny": TINY,  # a few minutes on a laptop CPU; build its data with fineweb_edu.py (see README)
    "tiny-modern": {**TINY, **MODERN},
    "tiny-speedrun": {**TINY, **SPEEDRUN},
    "tiny-edm2": {**TINY, **EDM2},
    "tiny-hypersphere": {**TINY, **HYPERSPHERE},
    "tiny-manifold": {**TINY, **MANIFOLD},
}

PRESET_DATA = {name: "python fineweb_edu.py --max-tokens 5000000 --shard-size 1000000"
               for name in PRESETS if name.startswith("tiny")}
TRAIN_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]
LEGACY = {f.name: f.metadata["legacy"] for f in TRAIN_FIELDS if f.metadata.get("legacy")}
MODEL_FIELDS = [f for f in dataclasses.fields(GPTConfig) if f.name not in ("block_size", "vocab_size")]
# the AdamW roles with settings of their own (adam_<role>_lr, ...); gpt2/optim.py says which parameters play each
ADAM_ROLES = tuple(f.name[len("adam_") : -len("_lr")] for f in TRAIN_FIELDS if re.fullmatch(r"adam_\w+_lr", f.name))

# Descriptions of the model fields that model.py leaves without a comment.
MODEL_HELP = {
    "n_layer": "transformer blocks", "n_head": "attention (query) heads; n_embd must be a multiple",
    "n_embd": "the residual stream's width", "rope_theta": "pos rope: the base of the rotation frequencies",
    "moe_top_k": "the experts each token goes to (with --moe-experts)",
}
# The valid range of each numeric flag whose range is not [0, inf); checked before any config is built. NaN and
# inf fall outside. The ones in CHECKED_JOINTLY are checked with their partners in check_flags.
RANGES = {
    "batch_size": "[1, inf)", "seq_len": "[1, inf)", "total_batch_size": "[1, inf)", "max_steps": "[1, inf)",
    "max_lr": "(0, inf)", "muon_lr": "(0, inf)", "min_lr_ratio": "[0, 1]", "decay_frac": "[0, 1]",
    "decay_ref_steps": "[1, inf)", "batch_ramp_start": "[0, 1)", "batch_ramp_frac": "[0, 1]",
    "window_ramp_frac": "[0, 1]", "seq_len_ramp_frac": "(0, 1]", "untie_at": "[0, 1)",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "muon_momentum": "[0, 1)",
    "ema_sigma_rel": "[0, 0.3]",  # 0: no EMA
    "vocab_multiple": "[1, inf)", "n_layer": "[1, inf)", "n_head": "[1, inf)", "n_embd": "[1, inf)",
    "rope_theta": "(0, inf)", "rope_factor": "[1, inf)", "rope_beta_fast": "(0, inf)", "rope_beta_slow": "(0, inf)",
    "rope_original_context": "[1, inf)", "moe_top_k": "[1, inf)", "mp_blend": "[0, 1]", "qk_norm_scale": "(0, inf)",
    **{f"adam_{role}_{beta}": "[0, 1)" for role in ADAM_ROLES for beta in ("beta1", "beta2")},  # 0: unset
}
ROLE_DECAYS = tuple(f"adam_{role}_wd" for role in ADAM_ROLES)  # -1 (unset) or >= 0, see check_flags
CHECKED_JOINTLY = ("muon_weight_decay", "muon_beta2", *ROLE_DECAYS)

# Fields that decide which tokens are seen and what the optimizer does (and every model field): a resumed run
# must not change them.
RESUME_MUST_MATCH = (
    "data_dir", "align_docs", "shuffle", "seq_len", "total_batch_size", "batch_ramp_start", "batch_ramp_frac",
    "window_start", "window_ramp_frac", "seq_len_start", "seq_len_ramp_frac", "yarn_follows", "untie_at", "max_lr",
    "min_lr_ratio", "schedule", "decay_frac", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2", "eps",
    "grad_clip", "optimizer", "muon_lr", "muon_momentum", "muon_momentum_warmup", "muon_fixed_norm", "muon_split",
    "muon_ns", "muon_weight_decay", "muon_cautious_wd", "muon_normuon", "muon_beta2", "muon_manifold",
    "muon_manifold_iters", "ema_sigma_rel", "ema_snapshot_every", "decay_ref_steps", "seed",
    *(f.name for f in TRAIN_FIELDS if f.name.startswith("adam_")),
)


def field_comments(cls) -> dict[str, str]:
    """Each field's `# comment` in cls's source, read with tokenize (a '#' in a string is no comment): the one on
    its line, else the block of comment lines right above it. --help shows it, so the dataclass stays the one place
    a flag is described."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {tok.start[0] - 1: tok.string.lstrip("# ") for tok in tokens if tok.type == tokenize.COMMENT}
    result = {}
    for i, line in enumerate(lines):
        if not (field_line := re.match(r"\s+(\w+)\s*:", line)):
            continue
        above = []
        for j in range(i - 1, -1, -1):
            if j not in comments or not lines[j].lstrip().startswith("#"):
                break
            above.insert(0, comments[j])
        if text := comments.get(i) or " ".join(above):
            result[field_line.group(1)] = text
    return result


def current_value(name: str, value):
    """A TrainConfig field's value as an older version wrote it (command line, config.json, checkpoint), as today's."""
    return LEGACY[name].get(value, value) if name in LEGACY else value


def field_choices(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a string field: TrainConfig's fields carry theirs, model.py's are in ARCH_CHOICES."""
    return f.metadata.get("choices", ARCH_CHOICES.get(f.name))


def flag_values(cfg: TrainConfig) -> dict:
    """Every flag's value in cfg, its model's fields included."""
    return {f.name: getattr(cfg, f.name) for f in TRAIN_FIELDS} | {f.name: getattr(cfg.model, f.name)
                                                                   for f in MODEL_FIELDS}


def preset_values(preset: str) -> dict:
    """Every flag's value under a preset before any other flag (run_name: the preset's name)."""
    return flag_values(TrainConfig()) | PRESETS[preset] | {"run_name": preset}


def changed_settings(cfg: TrainConfig, preset: str) -> str:
    """'preset tiny, changed: max_steps=20, val_every=10': a run's settings in one line (config.json has them all)."""
    current, base = flag_values(cfg), preset_values(preset)

    def shown(v):  # as a flag takes it: 0/1 for switches, quotes only around text with spaces
        return int(v) if isinstance(v, bool) else repr(v) if isinstance(v, str) and (" " in v or not v) else v

    changed = [f"{k}={shown(v)}" for k, v in current.items() if v != base[k]]
    return f"preset {preset}, changed: {', '.join(changed) or 'nothing'}"


def parse_config(argv=None, description: str | None = None) -> tuple[TrainConfig, str]:
    """The TrainConfig of a command line (argv, or sys.argv) and its preset's name; description heads --help."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                           usage="%(prog)s [--preset NAME] [--FLAG VALUE ...] (the flags below)")
    preset_help = "the defaults the other flags override; each flag's [value] below is the chosen preset's"
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS), help=preset_help)
    first = OneLineParser(add_help=False)  # --preset before --help: `--preset tiny --help` shows tiny's
    first.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    preset = first.parse_known_args(argv)[0].preset
    comments = {**field_comments(GPTConfig), **MODEL_HELP, **field_comments(TrainConfig)}
    defaults = preset_values(preset)
    for f in TRAIN_FIELDS + MODEL_FIELDS:
        is_bool = f.type is bool
        about = comments.get(f.name, "").replace("%", "%%")
        default = int(defaults[f.name]) if is_bool else defaults[f.name]
        parse = functools.partial(current_value, f.name) if f.name in LEGACY else f.type  # --align-docs 1: crop
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=int if is_bool else parse, default=None,
                            choices=[0, 1] if is_bool else field_choices(f),
                            help=f"{about} [{preset}: {default!r}]".lstrip())
    args = parser.parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k != "preset" and v is not None}}
    bools = {f.name for f in TRAIN_FIELDS + MODEL_FIELDS if f.type is bool}
    values = {k: bool(v) if k in bools else v for k, v in values.items()}
    check_ranges(parser, values)  # first: GPTConfig would divide by an --n-head 0
    model_names = {f.name for f in MODEL_FIELDS}
    base = TrainConfig()
    try:  # inconsistent flags, e.g. --n-kv-head not dividing --n-head, or a preset's value out of its choices
        model = dataclasses.replace(base.model, block_size=values.get("seq_len", base.seq_len),
                                    **{k: v for k, v in values.items() if k in model_names})
        cfg = TrainConfig(model=model, **{k: v for k, v in values.items() if k not in model_names})
    except ValueError as e:
        parser.error(str(e))
    cfg.run_name = cfg.run_name or args.preset
    check_flags(parser, cfg, base)
    return cfg, args.preset


def check_ranges(parser: argparse.ArgumentParser, values: dict):
    """Each numeric flag within its range (RANGES; [0, inf) where none is listed), else argparse's error."""
    numeric = [f for f in TRAIN_FIELDS + MODEL_FIELDS if f.type in (int, float) and f.name not in CHECKED_JOINTLY]
    for f in numeric:
        if f.name not in values:
            continue
        value, allowed = values[f.name], RANGES.get(f.name, "[0, inf)")
        low_side, low, high, high_side = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", allowed).groups()
        above = value >= float(low) if low_side == "[" else value > float(low)
        below = value <= float(high) if high_side == "]" else value < float(high)
        if not (above and below):  # NaN fails both
            need = f"{'>=' if low_side == '[' else '>'} {low}" if high == "inf" else f"in {allowed}"
            parser.error(f"--{f.name.replace('_', '-')} must be {need}, got {value!r}")


def check_flags(parser: argparse.ArgumentParser, cfg: TrainConfig, defaults: TrainConfig):
    """Flags that are each valid but not together: argparse's error names them and exits."""
    if cfg.muon_fixed_norm and (cfg.optimizer != "muon" or cfg.model.zero_init):
        parser.error("--muon-fixed-norm 1 needs --optimizer muon, and no --zero-init (a zero matrix would stay zero)")
    muon_switches = ("muon_split", "muon_ns", "muon_weight_decay", "muon_cautious_wd", "muon_normuon", "muon_beta2",
                     "muon_manifold", "muon_manifold_iters")
    changed = [k for k in muon_switches if getattr(cfg, k) != getattr(defaults, k)]
    if changed and cfg.optimizer != "muon":
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in changed)} need --optimizer muon")
    if cfg.muon_weight_decay < 0 or (cfg.muon_weight_decay and cfg.muon_fixed_norm):
        parser.error("--muon-weight-decay must be >= 0, and 0 with --muon-fixed-norm 1 (which restores the norm)")
    if cfg.muon_cautious_wd and not cfg.muon_weight_decay:
        parser.error("--muon-cautious-wd 1 needs a --muon-weight-decay > 0 to be cautious about")
    if not 0 <= cfg.muon_beta2 < 1:
        parser.error(f"--muon-beta2 must be in [0, 1), got {cfg.muon_beta2!r}")
    for name in ROLE_DECAYS:
        if not (getattr(cfg, name) == -1 or getattr(cfg, name) >= 0):  # NaN fails both
            parser.error(f"--{name.replace('_', '-')} must be >= 0, or -1 (unset), got {getattr(cfg, name)!r}")
    check_manifold(parser, cfg, defaults)
    check_curriculum(parser, cfg, defaults)
    if cfg.model.edm2_storage != defaults.model.edm2_storage and cfg.model.mode != "edm2":
        parser.error(f"--edm2-storage {cfg.model.edm2_storage} needs --mode edm2 (it says how EDM2 stores its weights)")
    if cfg.ema_snapshot_every and not cfg.ema_sigma_rel:
        parser.error("--ema-snapshot-every needs --ema-sigma-rel")
    if problem := command_problem(cfg.checkpoint_sync):
        parser.error(f"--checkpoint-sync {cfg.checkpoint_sync!r}: {problem}")


def check_manifold(parser: argparse.ArgumentParser, cfg: TrainConfig, defaults: TrainConfig):
    """--muon-manifold stiefel fixes every Muon matrix's singular values at 1: switches that set norms or reshape
    the update have no meaning on it."""
    if cfg.muon_manifold == "none":
        if cfg.muon_manifold_iters != defaults.muon_manifold_iters:
            parser.error("--muon-manifold-iters needs --muon-manifold stiefel")
        return
    clashes = {"--muon-weight-decay": cfg.muon_weight_decay, "--muon-fixed-norm": cfg.muon_fixed_norm,
               "--muon-normuon": cfg.muon_normuon, "--muon-ns": cfg.muon_ns != defaults.muon_ns,
               "--zero-init": cfg.model.zero_init, "--mode": cfg.model.mode != "gpt2"}
    if any(clashes.values()):
        parser.error(f"--muon-manifold stiefel keeps every Muon matrix semi-orthogonal, which "
                     f"{', '.join(k for k, v in clashes.items() if v)} would fight or make meaningless (the manifold "
                     "sets the norms and has its own fp32 iteration, a zero matrix has no polar factor, edm2 and "
                     "hypersphere renormalize rows)")


def check_curriculum(parser: argparse.ArgumentParser, cfg: TrainConfig, defaults: TrainConfig):
    """The growing rows, YaRN following them and the late untied head (gpt2/curriculum.py): what each needs."""
    start, end = cfg.seq_len_start, cfg.seq_len
    if start and not (start < end and end % start == 0 and (end // start).bit_count() == 1):
        parser.error(f"--seq-len-start {start} needs --seq-len {end} to be it times 2, 4, 8, ... (rows double from it "
                     f"to --seq-len): e.g. --seq-len-start {end // 2} or {end // 4}")
    grows = {"seq-len": ("--seq-len-start", start), "window": ("--window-start", cfg.window_start)}
    if cfg.yarn_follows != "none":
        flag, value = grows[cfg.yarn_follows]
        model, base = cfg.model, defaults.model
        if not value or model.rope_scaling != "yarn":
            parser.error(f"--yarn-follows {cfg.yarn_follows} needs {flag} (what it follows) and --pos rope "
                         "--rope-scaling yarn")
        if (model.rope_factor, model.rope_original_context) != (base.rope_factor, base.rope_original_context):
            parser.error(f"--yarn-follows {cfg.yarn_follows} sets YaRN's original context ({flag}) and factor (the "
                         "step's length over it) itself: leave --rope-factor and --rope-original-context out")
    if cfg.untie_at:
        step = round(cfg.untie_at * cfg.max_steps)
        if not cfg.model.tie_head or cfg.ema_sigma_rel:
            parser.error("--untie-at needs a tied head (--tie-head 1: the modern and speedrun presets untie it) and no "
                         "--ema-sigma-rel (the EMA does not follow a parameter that appears mid-run)")
        if not 0 < step < cfg.max_steps:
            parser.error(f"--untie-at {cfg.untie_at} unties at step {step} of --max-steps {cfg.max_steps}: pick a "
                         f"share that lands between step 1 and {cfg.max_steps - 1}")
