"""Text from a trained model, printed token by token as it is generated.

    python sample.py --checkpoint logs/tiny/ckpt_0000300.pt --prompt "The king said"
    python sample.py --model gpt2 --temperature 0 --max-new-tokens 40    # OpenAI's weights, greedy

--checkpoint takes any train_gpt2.py checkpoint (every preset, switch and mode) or a model ema.py wrote;
--model an HF GPT-2 directory (save_pretrained / export_hf) or a hub name. Samples come one after another from
one random generator seeded with --seed, so a command prints the same text every time on the same device.
"""

import argparse
import codecs

import tiktoken
import torch

from gpt2.dataloader import gpt2_tokenizer
from gpt2.hf_io import from_pretrained
from gpt2.runs import load_model
from gpt2.runtime import OneLineParser, autocast, autocast_dtype, pick_device
from model import GPT


def stream_text(token_ids, enc: tiktoken.Encoding):
    """The text of a stream of token ids, piece by piece as they come. A character whose UTF-8 bytes are split
    across tokens comes out once it is complete; bytes that never form one become U+FFFD, as enc.decode does."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        if text := decoder.decode(enc.decode_single_token_bytes(token)):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def load(args) -> GPT:
    try:
        return from_pretrained(args.model) if args.model else load_model(args.checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def prompt_ids(prompt: str, enc: tiktoken.Encoding, max_new_tokens: int, block_size: int | None) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|>, as a new document would. block_size: the
    longest sequence the model takes, None for no limit (pos rope: e.g. YaRN's extended context)."""
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    if block_size is not None and len(ids) + max_new_tokens > block_size:
        raise SystemExit(f"--max-new-tokens {max_new_tokens}: the prompt's {len(ids)} tokens plus the new ones exceed "
                         f"the model's block size {block_size}; ask for at most {block_size - len(ids)}")
    return ids


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a checkpoint saved by train_gpt2.py (or a model ema.py wrote)")
    weights.add_argument("--model", help="HF GPT-2 name (gpt2, gpt2-medium, ...) or a local HF model directory")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype: auto = bfloat16 on CUDA, float32 elsewhere")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_new_tokens < 0 or args.num_samples < 1:
        p.error("--temperature, --top-k and --max-new-tokens must be >= 0, --num-samples >= 1")

    enc = gpt2_tokenizer()  # before the model: offline without its cache, say so first
    device = pick_device(args.device)
    model = load(args).to(device).eval()
    limit = model.config.block_size if model.config.pos == "learned" else None  # rope runs past the trained context
    idx = torch.tensor([prompt_ids(args.prompt, enc, args.max_new_tokens, limit)], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(device, autocast_dtype(args.dtype, device)):
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            print(args.prompt, end="", flush=True)
            new_ids = (t.item() for t in model.generate_tokens(idx, args.max_new_tokens, args.temperature,
                                                                 args.top_k or None, gen))
            for text in stream_text(new_ids, enc):
                print(text, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
