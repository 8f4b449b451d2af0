"""GPT-2's val loss on a data folder's val tokens, computed as train_gpt2.py computes a run's, and cached for plot_logs.

    python -m tools.reference_loss --model gpt2 --data-dir data/fineweb_edu [--seq-len 1024] [--val-tokens 10485760]
        [--batch-size 64] [--log-dir logs] [--device auto] [--dtype auto]

--model: a Hugging Face hub name (gpt2, gpt2-medium, ...: needs internet and transformers) or a folder written by
transformers' save_pretrained (offline). The loss is train_gpt2.val_loss over the val batches train_gpt2.open_data
picks for these settings (one rank), and goes to <log-dir>/reference/<model>_<hash>.json together with the identity
of the folder's val shards (their sha256s in the manifest) and seq_len and val_tokens. plot_logs.py draws it on the
val panel of every run whose config.json has the same val shards, seq_len and val_tokens. A second call with the
same model, val shards and settings reads that file instead of loading the model; delete it to compute again.

This module imports no torch until it computes: plot_logs.py reads the cache through it.
"""

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

from gpt2.dataloader import DataError, read_manifest, shards_identity

KIND = "gpt2_val_reference"  # marks a cache file among other JSON files
SUBDIR = "reference"  # the cache folder under a log dir: logs/reference/


def val_identity(manifest: dict) -> str:
    """A hash over the val shards' names and sha256s: the val tokens, whatever the train split holds."""
    return shards_identity([s for s in manifest["shards"] if s["split"] == "val"])


def data_val_identity(data_dir) -> str | None:
    """val_identity of a finished shard folder; None where there is none to read (e.g. logs copied to a laptop)."""
    try:
        return val_identity(read_manifest(data_dir))
    except DataError:
        return None


def cache_path(log_dir, model: str, identity: str, seq_len: int, val_tokens: int) -> Path:
    key = hashlib.sha256(json.dumps([model, identity, seq_len, val_tokens]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name) or "model"  # a hub name, or a folder's last part
    return Path(log_dir) / SUBDIR / f"{slug}_{key}.json"


def read_references(folders) -> list[dict]:
    """The cache files in folders; anything else there (other JSON, a file cut short) is passed over."""
    found = []
    for path in sorted(p for folder in folders if Path(folder).is_dir() for p in Path(folder).glob("*.json")):
        try:
            ref = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(ref, dict) and ref.get("kind") == KIND:
            found.append(ref)
    return found


def find_reference(config: dict, folders) -> tuple[dict | None, bool]:
    """The cached reference for a run's config.json (data_dir, seq_len, val_tokens), and whether it was matched by
    the folder's name only: where the data folder is not here to identify its val shards."""
    identity = data_val_identity(config["data_dir"])
    same = [r for r in read_references(folders)
            if (r["seq_len"], r["val_tokens"]) == (config["seq_len"], config["val_tokens"])
            and (r["val_identity"] == identity if identity else
                 os.path.normpath(r["data_dir"]) == os.path.normpath(config["data_dir"]))]
    # OpenAI's 124M first when several models were computed for the same tokens
    return min(same, key=lambda r: (r["model"] != "gpt2", r["model"]), default=None), identity is None


def compute(model: str, data_dir, seq_len: int, batch_size: int, val_tokens: int, device="auto",
            dtype="auto") -> dict:
    """Mean val loss (and bits per byte) of the HF weights `model` over the val batches a one-rank run with these
    settings evaluates: train_gpt2's own open_data and val_loss."""
    import dataclasses

    from gpt2 import hf_io
    from gpt2.runtime import Dist, autocast_dtype, pick_device
    from train_gpt2 import TrainConfig, open_data, val_loss

    dev = pick_device(device)
    cfg = dataclasses.replace(TrainConfig(), data_dir=str(data_dir), seq_len=seq_len, batch_size=batch_size,
                              val_tokens=val_tokens)
    d = Dist(rank=0, local_rank=0, world_size=1, device=dev)
    _, loader, batches = open_data(cfg, d, preset="")
    net = hf_io.from_pretrained(model).to(dev)
    if seq_len > net.config.block_size:
        raise SystemExit(f"--seq-len {seq_len} is longer than {model}'s {net.config.block_size} positions")
    loss, bpb = val_loss(net, loader, batches, autocast_dtype(dtype, dev), d)
    return {"loss": loss, "bpb": bpb, "tokens": batches * batch_size * seq_len, "batch_size": batch_size,
            "dtype": str(autocast_dtype(dtype, dev)).removeprefix("torch."), "device": str(dev)}


def reference(model: str, data_dir, seq_len: int, val_tokens: int, batch_size: int, log_dir="logs", device="auto",
              dtype="auto") -> tuple[dict, Path]:
    """The cached reference for these settings, computed and written first if there is none yet."""
    identity = val_identity(read_manifest(data_dir))
    path = cache_path(log_dir, model, identity, seq_len, val_tokens)
    if path.exists():
        return json.loads(path.read_text()), path
    ref = {"kind": KIND, "model": model, "data_dir": str(data_dir), "val_identity": identity, "seq_len": seq_len,
           "val_tokens": val_tokens, **compute(model, data_dir, seq_len, batch_size, val_tokens, device, dtype)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # then a rename: plot_logs never reads half a file
    tmp.write_text(json.dumps(ref, indent=2) + "\n")
    os.replace(tmp, path)
    return ref, path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="HF hub name (needs internet) or save_pretrained folder")
    parser.add_argument("--data-dir", required=True, help="shard folder built by fineweb_edu.py")
    # the defaults are train_gpt2.py's (GPT-2 124M on FineWeb-Edu)
    parser.add_argument("--seq-len", type=int, default=1024, help="the runs' --seq-len")
    parser.add_argument("--val-tokens", type=int, default=10_485_760, help="the runs' --val-tokens")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="rows per val batch: a run on N GPUs reads the val tokens of N x its --batch-size; every "
                             "batch size that divides val_tokens / seq_len reads the same ones, where the split holds "
                             "val_tokens")
    parser.add_argument("--log-dir", default="logs", help="the cache goes to LOG_DIR/reference/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="autocast as in train_gpt2.py: auto = bfloat16 on CUDA, else float32")
    args = parser.parse_args(argv)
    try:
        ref, path = reference(args.model, args.data_dir, args.seq_len, args.val_tokens, args.batch_size, args.log_dir,
                              args.device, args.dtype)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{ref['model']} on the first {ref['tokens']:,} val tokens of {ref['data_dir']} (seq_len {ref['seq_len']}): "
          f"val loss {ref['loss']:.4f}, {ref['bpb']:.4f} bits per byte ({path})")
    return ref


if __name__ == "__main__":
    main()
