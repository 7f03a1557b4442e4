"""`vitpipe verify`: a good shard set passes; each kind of damage is named."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import pytest

from pipeline.index import INDEX_NAME
from pipeline.verify import verify
from vitpipe.cli import main


@pytest.fixture
def shards(digits_shards, tmp_path):
    """A private copy of the digits shard set that a test may damage."""
    return shutil.copytree(digits_shards, tmp_path / "shards")


def test_good_set_passes_through_the_cli(shards, capsys):
    assert verify(str(shards)) == []
    assert main(["verify", str(shards)]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_flipped_byte_is_a_checksum_mismatch(shards, capsys):
    path = shards / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first image's bytes: the tar structure stays readable
    path.write_bytes(bytes(data))
    problems = verify(str(shards))
    assert problems == [p for p in problems if p.startswith("train-000001.tar: sha256")] and len(problems) == 1
    assert main(["verify", str(shards)]) == 1
    assert "MISMATCH train-000001.tar: sha256" in capsys.readouterr().err


def test_missing_truncated_and_stray_shards_are_named(shards):
    (shards / "train-000000.tar").unlink()
    data = (shards / "val-000000.tar").read_bytes()
    (shards / "val-000000.tar").write_bytes(data[: len(data) // 2])
    (shards / "train-000009.tar").write_bytes(b"")
    (shards / "train-000002.tar.tmp-123").write_bytes(b"half")
    problems = "\n".join(verify(str(shards)))
    assert "train-000000.tar: missing" in problems
    assert "val-000000.tar: not a readable tar (ReadError: unexpected end of data)" in problems
    assert "train-000009.tar: a shard file the index does not list" in problems
    assert "train-000002.tar.tmp-123: a half-written shard" in problems


def test_sample_count_and_class_ids_are_checked(shards):
    # Re-pack a shard without its last sample and with a bad class id, then fix up its checksum
    # and size in the index so only the count and the class id can give it away.
    path = shards / "val-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = members[:-3]
    first_cls = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".cls"))
    members[first_cls] = (members[first_cls][0], b"42")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    index = json.loads((shards / INDEX_NAME).read_text())
    entry = index["splits"]["val"]["shards"][0]
    entry["num_bytes"] = path.stat().st_size
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    delta = index["splits"]["val"]["num_bytes"] - sum(s["num_bytes"] for s in index["splits"]["val"]["shards"])
    index["splits"]["val"]["num_bytes"] -= delta
    index["totals"]["num_bytes"] -= delta
    (shards / INDEX_NAME).write_text(json.dumps(index))
    # the wids and DALI indexes no longer fit the re-packed shard either (test_interop.py covers those)
    problems = [p for p in verify(str(shards)) if not p.startswith(("val.wids.json", "val-000000.idx"))]
    n = index["splits"]["val"]["num_samples"]
    assert problems == [f"val-000000.tar: {members[first_cls][0].name} is 42, outside 0..9",
                        f"val-000000.tar: {n - 1} samples, index says {n}"]


def test_failures_count_must_match(shards):
    (shards / "failures.jsonl").write_text('{"source": "x", "reason": "empty", "detail": ""}\n')
    assert verify(str(shards)) == ["failures.jsonl: 1 lines, index says num_failures=0"]


def test_a_file_or_the_index_itself_as_out(shards, tmp_path, capsys):
    # A regular file is not a shard set: one line, as for a missing folder, not a traceback.
    stray = tmp_path / "photo.png"
    stray.write_bytes(b"\x89PNG")
    assert main(["verify", str(stray)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{str(stray)!r} is a file, not a shard set folder" in err
    # index.json itself names the shard set, and is named once in the message
    assert main(["verify", str(shards / INDEX_NAME)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"match {shards / INDEX_NAME}")


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sample_checks_n_shards_drawn_by_the_seed(shards, capsys):
    """--sample 2 of 5 shards: some seeds draw the damaged one (and name it), others do not; a
    seed always draws the same shards; the missing and stray files are found either way."""
    _flip_a_byte(shards / "train-000001.tar")
    runs = {seed: verify(str(shards), sample=2, seed=seed) for seed in range(12)}
    assert all(x.startswith("train-000001.tar: sha256") for p in runs.values() for x in p)
    hits = [seed for seed, p in runs.items() if p]
    assert 0 < len(hits) < 12  # 2 of 5 drawn: 40% of seeds on average
    assert verify(str(shards), sample=2, seed=hits[0]) == runs[hits[0]]
    assert verify(str(shards), sample=50) == verify(str(shards))  # a sample of all is all
    miss = next(seed for seed, p in runs.items() if not p)
    assert main(["verify", str(shards), "--sample", "2", "--seed", str(miss)]) == 0
    assert "verify: OK, 2 of 5 shards (drawn with --seed" in capsys.readouterr().out
    (shards / "val-000000.tar").unlink()
    (shards / "train-000042.tar").write_bytes(b"")
    problems = "\n".join(verify(str(shards), sample=1, seed=miss))
    assert "train-000042.tar: a shard file the index does not list" in problems
    assert main(["verify", str(shards), "--sample", "0"]) == 2  # argparse: must be >= 1


def test_sample_reads_the_dali_index_of_the_drawn_shards_only(shards, monkeypatch):
    """A stale DALI index is named by a full verify and by a sample that draws its shard; a sample
    reads no other shard's headers for DALI (on 10,000 shards that would be most of the work)."""
    import pipeline.interop

    (shards / "train-000001.idx").write_text("stale 0 0\n")
    assert [p.split(":")[0] for p in verify(str(shards))] == ["train-000001.idx"]
    read = []
    real = pipeline.interop.dali_index
    monkeypatch.setattr(pipeline.interop, "dali_index", lambda path: read.append(path.name) or real(path))
    drawn = {seed: verify(str(shards), sample=1, seed=seed) for seed in range(8)}
    assert len(read) == 8 and set(read) > {"train-000001.tar"}  # one shard's headers per run: the drawn one
    assert {tuple(p) for p in drawn.values()} == {(), tuple(verify(str(shards)))}


@pytest.mark.multiprocess
def test_workers_find_the_same_problems_in_the_same_order(shards):
    _flip_a_byte(shards / "train-000001.tar")
    (shards / "val-000000.tar").unlink()
    data = (shards / "train-000003.tar").read_bytes()
    (shards / "train-000003.tar").write_bytes(data[: len(data) // 2])
    one = verify(str(shards))
    assert {p.split(":")[0] for p in one} == {"train-000001.tar", "train-000003.tar", "val-000000.tar"}
    assert verify(str(shards), workers=3) == one
