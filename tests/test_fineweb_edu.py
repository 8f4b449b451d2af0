"""fineweb_edu.py: shards give back every source document, val/train split, exact resume, clear errors."""

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb_edu

ROOT = Path(__file__).resolve().parent.parent
EOT = 50256


@pytest.fixture(scope="module")
def enc():
    return tiktoken.get_encoding("gpt2")


def paragraphs(path: Path) -> list[str]:
    return [p for p in path.read_bytes().decode("utf-8").split("\n\n") if p.strip()]


def messy_documents(n: int, seed: int = 0) -> list[str]:
    """Many small documents: empty ones, non-Latin scripts, emoji, combining marks, a literal <|endoftext|>."""
    rng = random.Random(seed)
    pieces = ["hello", "wörld", "日本語の文章", "🎉🚀👩‍👩‍👧", "مرحبا بالعالم", "e\u0301", "Ω≈ç√∫", "z̴͉̓a̶l̷g̸o",
              "<|endoftext|>", "tab\there", "\n", "\n\n", "  ", "1234567", "über-straße", "ж"]
    return ["" if rng.random() < 0.05 else "".join(rng.choices(pieces, k=rng.randint(1, 40))) for _ in range(n)]


def build(source, out, shard_size, **kw) -> dict:
    return fineweb_edu.build(str(source), out, shard_size, workers=kw.pop("workers", 1), **kw)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def check_shards(out: Path, docs: list[str], shard_size: int, enc) -> dict:
    """Check a finished build against the documents it was made from, with tiktoken as the reference."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokenizer"] == "gpt2" and manifest["shard_size"] == shard_size
    shards = [np.load(out / s["file"]) for s in manifest["shards"]]
    stream = np.concatenate(shards)
    naive = np.array([t for doc in docs for t in [EOT, *enc.encode_ordinary(doc)]], dtype=np.uint16)
    assert stream.dtype == np.uint16 and np.array_equal(stream, naive)

    def decode_docs(tokens):  # split at each <|endoftext|> and decode what follows it
        assert tokens[0] == EOT, "a shard run must start with a document"
        return [enc.decode(seg[1:].tolist()) for seg in np.split(tokens, np.flatnonzero(tokens == EOT)[1:])]

    assert decode_docs(stream) == docs

    for entry, tokens in zip(manifest["shards"], shards, strict=True):
        assert entry["tokens"] == len(tokens) and entry["docs"] == np.count_nonzero(tokens == EOT)
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
    assert manifest["totals"]["val"] == {"tokens": len(shards[0]), "docs": manifest["shards"][0]["docs"]}
    assert manifest["totals"]["train"]["tokens"] + len(shards[0]) == len(naive)
    assert manifest["totals"]["train"]["docs"] + manifest["totals"]["val"]["docs"] == len(docs)

    # shard 0 is val, cut at the end of the document that crosses shard_size; train shards are full-size
    assert [s["split"] for s in manifest["shards"]] == ["val"] + ["train"] * (len(shards) - 1)
    assert all(s["file"].endswith(f"_{s['split']}_{i:06d}.npy") for i, s in enumerate(manifest["shards"]))
    val, train = shards[0], shards[1:]
    assert len(val) >= min(shard_size, len(naive)) and np.flatnonzero(val == EOT)[-1] < shard_size
    assert all(len(t) == shard_size for t in train[:-1]) and all(0 < len(t) <= shard_size for t in train)
    if train:  # no document in both: val decodes to the first k documents, train to the rest
        n_val = manifest["shards"][0]["docs"]
        assert decode_docs(val) == docs[:n_val] and decode_docs(np.concatenate(train)) == docs[n_val:]
    return manifest


def test_cli_shakespeare_paragraphs(tmp_path, shakespeare_path, enc):
    out = tmp_path / "out"
    cmd = [sys.executable, "fineweb_edu.py", "--source", str(shakespeare_path), "--txt-docs", "paragraphs",
           "--shard-size", "40000", "--workers", "2", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "tokens/s with 2 workers" in run.stdout
    manifest = check_shards(out, paragraphs(shakespeare_path), 40000, enc)
    assert len(manifest["shards"]) == 9 and manifest["source"] == str(shakespeare_path.resolve())


def test_txt_file_is_one_document(tmp_path, shakespeare_path, enc, capsys):
    build(shakespeare_path, tmp_path, 40000)
    manifest = check_shards(tmp_path, [shakespeare_path.read_bytes().decode("utf-8")], 40000, enc)
    assert manifest["totals"]["val"]["tokens"] == 338_025 + 1 and len(manifest["shards"]) == 1
    assert "no train split" in capsys.readouterr().out


def test_parquet_many_small_documents(tmp_path, enc):
    docs = messy_documents(1500)
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=200)  # several row groups
    manifest = build(tmp_path / "docs.parquet", tmp_path / "out", 5000, workers=2)
    check_shards(tmp_path / "out", docs, 5000, enc)
    assert len(manifest["shards"]) > 5 and manifest["shards"][0]["file"] == "docs_val_000000.npy"


def test_jsonl_and_folder_sources(tmp_path, shakespeare_path, enc):
    docs = messy_documents(300, seed=1)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs))
    build(tmp_path / "docs.jsonl", tmp_path / "jsonl_out", 1000)
    check_shards(tmp_path / "jsonl_out", docs, 1000, enc)

    # a folder is read in sorted path order, subfolders included, other files ignored
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(tmp_path / "docs.jsonl", src / "b.jsonl")
    shutil.copy(shakespeare_path, src / "a.txt")
    extra = messy_documents(50, seed=2)
    pq.write_table(pa.table({"text": extra}), src / "sub" / "c.parquet")
    (src / "notes.md").write_text("not a source file")
    build(src, tmp_path / "folder_out", 20000, workers=2)
    check_shards(tmp_path / "folder_out", [shakespeare_path.read_bytes().decode("utf-8"), *docs, *extra], 20000, enc)


def test_max_tokens_cuts_and_extends(tmp_path, shakespeare_path):
    kw = {"txt_docs": "paragraphs"}
    full = build(shakespeare_path, tmp_path / "full", 20000, **kw)
    stream = np.concatenate([np.load(tmp_path / "full" / s["file"]) for s in full["shards"]])
    for m in (30_000, 125_000):
        build(shakespeare_path, tmp_path / f"m{m}", 20000, max_tokens=m, **kw)
        cut = json.loads((tmp_path / f"m{m}" / "manifest.json").read_text())
        assert sum(s["tokens"] for s in cut["shards"]) == m
        tokens = np.concatenate([np.load(tmp_path / f"m{m}" / s["file"]) for s in cut["shards"]])
        assert np.array_equal(tokens, stream[:m])

    # raising --max-tokens (or dropping it) keeps the shards it leaves unchanged; lowering it removes the rest
    grow = tmp_path / "m30000"
    build(shakespeare_path, grow, 20000, max_tokens=125_000, **kw)
    assert files(grow) == files(tmp_path / "m125000")
    build(shakespeare_path, grow, 20000, **kw)
    assert files(grow) == files(tmp_path / "full")
    build(shakespeare_path, grow, 20000, max_tokens=125_000, **kw)
    assert files(grow) == files(tmp_path / "m125000")


@pytest.mark.parametrize("stop_at_shard", [1, 4])
def test_interrupted_run_resumes_byte_identical(tmp_path, shakespeare_path, monkeypatch, capsys, stop_at_shard):
    kw = {"txt_docs": "paragraphs"}
    reference = build(shakespeare_path, tmp_path / "ref", 20000, **kw)
    total = sum(s["tokens"] for s in reference["shards"])

    # die right after the k-th shard file is renamed into place, before the manifest records it
    real_write, written = fineweb_edu._write_atomic, []

    def write_then_die(path, write):
        real_write(path, write)
        written.append(path)
        if path.suffix == ".npy" and sum(p.suffix == ".npy" for p in written) == stop_at_shard:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(fineweb_edu, "_write_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(shakespeare_path, out, 20000, **kw)
    monkeypatch.undo()
    manifest = out / "manifest.json"
    recorded = json.loads(manifest.read_text())["shards"] if manifest.exists() else []
    assert len(recorded) == stop_at_shard - 1 and (out / reference["shards"][stop_at_shard - 1]["file"]).exists()
    (out / "input_train_000009.npy.tmp").write_bytes(b"half a shard from a killed run")
    capsys.readouterr()

    build(shakespeare_path, out, 20000, workers=2, **kw)
    kept = sum(s["tokens"] for s in reference["shards"][: stop_at_shard - 1])
    assert f"tokenized {total - kept:,} tokens" in capsys.readouterr().out  # only the missing shards were made
    assert files(out) == files(tmp_path / "ref")


def test_damaged_shards_are_rebuilt(tmp_path, shakespeare_path, capsys):
    kw = {"txt_docs": "paragraphs"}
    build(shakespeare_path, tmp_path / "ref", 20000, **kw)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    build(shakespeare_path, out, 20000, **kw)
    assert "nothing to do" in capsys.readouterr().out

    with open(out / "input_train_000003.npy", "r+b") as f:
        f.truncate(1000)
    build(shakespeare_path, out, 20000, **kw)
    assert "rebuilding from input_train_000003.npy" in capsys.readouterr().out
    assert files(out) == files(tmp_path / "ref")

    data = bytearray((out / "input_train_000005.npy").read_bytes())
    data[-7] ^= 1  # same size, one bit off: only the sha256 can tell
    (out / "input_train_000005.npy").write_bytes(bytes(data))
    build(shakespeare_path, out, 20000, **kw)
    assert "rebuilding from input_train_000005.npy" in capsys.readouterr().out
    assert files(out) == files(tmp_path / "ref")


def test_refuses_folder_of_other_settings(tmp_path, shakespeare_path):
    build(shakespeare_path, tmp_path, 20000, txt_docs="paragraphs")
    with pytest.raises(SystemExit, match="--shard-size 20000.*another --out"):
        build(shakespeare_path, tmp_path, 30000, txt_docs="paragraphs")
    (tmp_path / "other.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(SystemExit, match=f"--source {shakespeare_path.resolve()}"):
        build(tmp_path / "other.jsonl", tmp_path, 20000, txt_docs="paragraphs")


def test_cli_errors(tmp_path, hellaswag_val_path):
    pq.write_table(pa.table({"body": ["no text column here"]}), tmp_path / "notext.parquet")
    cases = [
        ("nosuch-dataset:foo", "unknown --source 'nosuch-dataset:foo'"),
        (str(hellaswag_val_path), f'{hellaswag_val_path}:1: each line must be a JSON object with a string "text"'),
        (str(tmp_path / "notext.parquet"), "notext.parquet has no 'text' column (it has ['body'])"),
    ]
    for source, message in cases:
        run = subprocess.run([sys.executable, "fineweb_edu.py", "--source", source, "--out", str(tmp_path / "out")],
                             cwd=ROOT, capture_output=True, text=True, check=False)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_hub_source_streams(tmp_path, monkeypatch, enc):
    """The hub path, offline: load_dataset is pointed at a local parquet file, streamed the same way."""
    datasets = pytest.importorskip("datasets")
    docs = messy_documents(400, seed=3)
    pq.write_table(pa.table({"text": docs, "score": [1.0] * len(docs)}), tmp_path / "hub.parquet", row_group_size=100)
    calls = []

    def local_load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return real_load_dataset("parquet", data_files=str(tmp_path / "hub.parquet"), split=split, streaming=streaming)

    real_load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", local_load_dataset)
    manifest = fineweb_edu.build("fineweb-edu", tmp_path / "out", 2000, workers=1)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert manifest["source"] == "fineweb-edu:sample-10BT"
    assert [s["file"] for s in manifest["shards"][:2]] == ["fineweb_edu_val_000000.npy", "fineweb_edu_train_000001.npy"]
    check_shards(tmp_path / "out", docs, 2000, enc)


def test_hub_source_names():
    assert fineweb_edu.resolve_source("fineweb-edu:sample-100BT").spec == "fineweb-edu:sample-100BT"
    plain = fineweb_edu.resolve_source("fineweb")
    assert (plain.spec, plain.prefix, plain.files) == ("fineweb:sample-10BT", "fineweb", ())


def test_empty_source(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="holds no documents"):
        build(tmp_path / "empty.jsonl", tmp_path / "out", 1000)
    assert not (tmp_path / "out" / "manifest.json").exists()
