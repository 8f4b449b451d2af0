"""fineweb_edu.py: shards give back every source document, val/train split, exact resume, clear errors."""

import hashlib
import http.server
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
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

    # raising --max-tokens (or dropping it) keeps the shards it leaves unchanged; lowering it below what is
    # built is refused, and every shard stays
    grow = tmp_path / "m30000"
    build(shakespeare_path, grow, 20000, max_tokens=125_000, **kw)
    assert files(grow) == files(tmp_path / "m125000")
    build(shakespeare_path, grow, 20000, **kw)
    assert files(grow) == files(tmp_path / "full")
    with pytest.raises(SystemExit, match=r"holds [\d,]+ tokens, more than --max-tokens 125,000.*pass another --out"):
        build(shakespeare_path, grow, 20000, max_tokens=125_000, **kw)
    assert files(grow) == files(tmp_path / "full")


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
    """The --max-tokens hub path, offline: load_dataset is pointed at a local parquet file, streamed the same way."""
    import datasets
    docs = messy_documents(400, seed=3)
    pq.write_table(pa.table({"text": docs, "score": [1.0] * len(docs)}), tmp_path / "hub.parquet", row_group_size=100)
    calls = []

    def local_load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return real_load_dataset("parquet", data_files=str(tmp_path / "hub.parquet"), split=split, streaming=streaming)

    real_load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", local_load_dataset)
    manifest = fineweb_edu.build("fineweb-edu", tmp_path / "out", 2000, max_tokens=10**9, workers=1)
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


# ---------------------------------------------------------------- hub downloads, against a local stand-in hub

REPO = "HuggingFaceFW/fineweb-edu"


class FakeHub:
    """The two hub endpoints the download path uses, served from a folder on 127.0.0.1: the tree API (files
    with size and LFS sha256) and resolve downloads with Range. It logs every request and can drop a
    connection part-way through a file, once."""

    def __init__(self, root: Path):
        self.root, self.requests, self.drop_after, self.wrong_sha = root, [], {}, set()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.requests.append((path, self.headers.get("Range")))
                tree, resolve = f"/api/datasets/{REPO}/tree/main/", f"/datasets/{REPO}/resolve/main/"
                if path.startswith(tree):
                    self.send_tree(path.removeprefix(tree))
                elif path.startswith(resolve) and (hub.root / path.removeprefix(resolve)).is_file():
                    self.send_file(path.removeprefix(resolve))
                else:
                    self.send_error(404)

            def send_tree(self, folder):
                entries = []
                for p in sorted((hub.root / folder).rglob("*")):
                    rel = p.relative_to(hub.root).as_posix()
                    if p.is_dir():
                        entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel})
                        continue
                    sha = hashlib.sha256(p.read_bytes()).hexdigest()
                    sha = "0" * 64 if rel in hub.wrong_sha else sha
                    entries.append({"type": "file", "oid": "1" * 40, "size": p.stat().st_size, "path": rel,
                                    "lfs": {"oid": sha, "size": p.stat().st_size, "pointerSize": 134}})
                self.send_body(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

            def send_file(self, rel):
                data = (hub.root / rel).read_bytes()
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1]) if self.headers["Range"] else 0
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
                cut = hub.drop_after.pop(rel, None)
                self.send_body(206 if start else 200, data[start:], headers, cut)

            def send_body(self, status, body, headers, cut=None):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.close_connection = cut is not None  # hang up with the body unfinished

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fetched(self) -> list[str]:
        """The files downloaded (or begun), one entry per request, in path order."""
        return sorted(path.split("/resolve/main/")[1] for path, _ in self.requests if "/resolve/main/" in path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub holding sample/10BT as 4 parquet files of messy documents (small row groups), plus files that
    are not part of the config."""
    monkeypatch.setattr(fineweb_edu, "RETRY_SECONDS", 0.0)
    folder = tmp_path / "hub" / "sample" / "10BT"
    folder.mkdir(parents=True)
    docs = []
    for i in range(4):
        part = messy_documents(120, seed=10 + i)
        pq.write_table(pa.table({"text": part, "id": [f"{i}-{j}" for j in range(len(part))]}),
                       folder / f"{i:03d}_00000.parquet", row_group_size=25)
        docs.append(part)
    (folder / "README.md").write_text("not a parquet file")
    (tmp_path / "hub" / "sample" / "100BT").mkdir()
    pq.write_table(pa.table({"text": ["another config"]}), tmp_path / "hub" / "sample" / "100BT" / "x.parquet")
    fake = FakeHub(tmp_path / "hub")
    fake.docs = docs  # per file
    fake.names = [f"sample/10BT/{i:03d}_00000.parquet" for i in range(4)]
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def hub_build(hub, out, **kw) -> dict:
    return fineweb_edu.build("fineweb-edu", out, 2000, workers=kw.pop("workers", 1), downloads=2,
                             hub_endpoint=hub.url, **kw)


def test_hub_download_survives_a_dropped_connection(hub, tmp_path, enc):
    hub.drop_after[hub.names[1]] = 3000
    manifest = hub_build(hub, tmp_path / "out")
    check_shards(tmp_path / "out", [d for part in hub.docs for d in part], 2000, enc)
    assert [f["path"] for f in manifest["hub_files"]] == hub.names
    assert [f["rows"] for f in manifest["hub_files"]] == [len(part) for part in hub.docs]
    # file 1 broke off after 3000 bytes and went on from there; every file came exactly once otherwise
    assert hub.fetched() == sorted([*hub.names, hub.names[1]])
    assert [r for p, r in hub.requests if p.endswith(hub.names[1])] == [None, "bytes=3000-"]
    assert not (tmp_path / "out" / "download").exists()


def test_hub_download_killed_and_resumed(hub, tmp_path, monkeypatch, capsys):
    reference = hub_build(hub, tmp_path / "ref")
    total = sum(s["tokens"] for s in reference["shards"])
    rows = [len(part) for part in hub.docs]
    # die when the shard after the first one to end inside file 2 (past its first row) is renamed into place,
    # before it is recorded: the resume starts in file 2, a few rows in
    stop_at = next(i for i, s in enumerate(reference["shards"]) if s["resume_doc"] > rows[0] + rows[1]) + 2
    real_write, written = fineweb_edu._write_atomic, []

    def write_then_die(path, write):
        real_write(path, write)
        written.append(path)
        if path.suffix == ".npy" and sum(p.suffix == ".npy" for p in written) == stop_at:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(fineweb_edu, "_write_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        hub_build(hub, out)
    monkeypatch.undo()
    monkeypatch.setattr(fineweb_edu, "RETRY_SECONDS", 0.0)
    assert not [t for t in threading.enumerate() if t.name.startswith("download")]  # the downloads stopped
    recorded = json.loads((out / "manifest.json").read_text())
    assert len(recorded["shards"]) == stop_at - 1 and recorded["hub_files"][2]["rows"] == rows[2]
    assert rows[0] + rows[1] < recorded["shards"][-1]["resume_doc"] < sum(rows[:3])
    on_disk = {p.relative_to(out / "download").as_posix() for p in (out / "download").rglob("*.parquet")}
    assert hub.names[0] not in on_disk and hub.names[1] not in on_disk  # tokenized into recorded shards: deleted
    (out / "download" / "sample" / "10BT" / "003_00000.parquet.123.tmp").write_bytes(b"half a file")
    hub.requests.clear()
    capsys.readouterr()

    hub_build(hub, out, workers=2)
    kept = sum(s["tokens"] for s in reference["shards"][: stop_at - 1])
    assert f"tokenized {total - kept:,} tokens" in capsys.readouterr().out
    assert files(out) == files(tmp_path / "ref")
    # no listing again, nothing before the resume point, no file the killed run had finished
    assert all("/resolve/main/" in p for p, _ in hub.requests)
    assert hub.fetched() == sorted(set(hub.names[2:]) - on_disk)


def test_hub_streamed_sample_extends_to_the_full_download(hub, tmp_path, monkeypatch):
    """A --max-tokens build streams through `datasets`; dropping --max-tokens continues it from the parquet files,
    which must hold the documents in the same order."""
    import datasets
    local = [str(hub.root / name) for name in hub.names]
    real_load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split, streaming:
                        real_load_dataset("parquet", data_files=local, split=split, streaming=streaming))
    reference = hub_build(hub, tmp_path / "ref")
    hub.requests.clear()
    hub_build(hub, tmp_path / "out", max_tokens=sum(s["tokens"] for s in reference["shards"][:7]) + 500)
    assert hub.requests == []
    hub_build(hub, tmp_path / "out")
    assert files(tmp_path / "out") == files(tmp_path / "ref")


def test_parquet_documents_from_a_row(tmp_path):
    docs = messy_documents(120, seed=5)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=25)
    for skip in (0, 1, 24, 25, 26, 60, 119, 120, 500):
        assert list(fineweb_edu._parquet_documents(tmp_path / "d.parquet", skip)) == docs[skip:]


def test_hub_download_errors(hub, tmp_path):
    hub.wrong_sha.add(hub.names[0])
    with pytest.raises(SystemExit, match=rf"{hub.names[0]} does not match the sha256 the hub lists"):
        hub_build(hub, tmp_path / "sha")
    with pytest.raises(SystemExit, match=r"no parquet files under sample/7BT/: is 'sample-7BT' one of its configs"):
        fineweb_edu.build("fineweb-edu:sample-7BT", tmp_path / "none", 2000, hub_endpoint=hub.url)
    assert fineweb_edu.hub_folder("default") == "data"
    assert fineweb_edu.hub_folder("CC-MAIN-2024-10") == "data/CC-MAIN-2024-10"
