"""Shared test set-up: the repo root on sys.path, offline data from ../shared, a tiktoken cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# tiktoken cannot download here; point it at the ready cache unless the user chose one
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")


def _shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.fail(f"missing test data {path}: these tests need the ../shared folder beside the repo")
    return path


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return _shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def hellaswag_val_path() -> Path:
    return _shared_file("hellaswag/hellaswag_val.jsonl")


@pytest.fixture(scope="session")
def shards(tmp_path_factory, shakespeare_path) -> str:
    """Tiny-shakespeare as uint16 shards, built by the real CLI: a 16k-token val shard and train shards."""
    out = tmp_path_factory.mktemp("shards") / "shakespeare"
    subprocess.run([sys.executable, str(ROOT / "fineweb_edu.py"), "--source", str(shakespeare_path), "--out", str(out),
                    "--shard-size", "16384", "--workers", "2", "--txt-docs", "paragraphs"], check=True, capture_output=True)
    return str(out)
