"""Default shards of a collection mixing JPEG and PNG, read by the readers users have: Hugging Face
`datasets` (regular, streaming, and a folder), wids, DALI, webdataset and GNU tar, with the same
bytes; and what `vitpipe verify` checks of their index files."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.index import load_index
from pipeline.interop import dali_index, image_member_ext
from vitpipe.cli import main as vitpipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixed_src(tmp_path_factory) -> Path:
    """3 classes of real images: two thirds JPEG, one third PNG (some grayscale), in class folders."""
    root = tmp_path_factory.mktemp("mixed") / "src"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (20, 24, 3) if i % 4 else (20, 24), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:02d}.{'png' if i % 3 == 0 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def long_named_shards(mixed_src, tmp_path_factory) -> Path:
    """The mixed collection plus a key over 100 bytes, whose members get GNU long-name headers."""
    src = tmp_path_factory.mktemp("long") / "src"
    shutil.copytree(mixed_src, src)
    shutil.copy(src / "eel" / "01.jpg", src / "eel" / f"{'long' * 30}.jpg")
    out = src.parent / "shards"
    assert vitpipe(["shard", str(src), str(out), "--val-ratio", "0.3", "--max-samples-per-shard", "6"]) == 0
    return out


@pytest.fixture(scope="module")
def mixed_shards(mixed_src, tmp_path_factory) -> Path:
    """`vitpipe shard` with its defaults (source bytes untouched), a few shards per split."""
    out = tmp_path_factory.mktemp("mixed_shards") / "shards"
    assert vitpipe(["shard", str(mixed_src), str(out), "--val-ratio", "0.3", "--max-samples-per-shard", "6"]) == 0
    return out


def _samples(out: Path, split: str) -> dict[str, dict]:
    """{key: {member ext: bytes}} of a split, read with Python's tarfile."""
    index = load_index(str(out))
    found: dict[str, dict] = {}
    for s in index["splits"][split]["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return found


def test_image_member_ext_is_the_most_common_format():
    assert image_member_ext(["a/1.jpg", "a/2.JPEG", "b/3.png"]) == "jpg"
    assert image_member_ext(["1.png", "2.png", "3.jpg"]) == "png"
    assert image_member_ext(["1.png", "2.jpg"]) == "jpg"  # a tie: alphabetical
    assert image_member_ext(["x/1.tif", "x/2.pgm", "x/3.tiff"]) == "tiff"
    assert image_member_ext(["https://host/img?id=3", "s3://b/k"]) == "jpg"  # no name says a format


def test_mixed_formats_share_one_member_name_and_keep_their_bytes(mixed_src, mixed_shards):
    index = load_index(str(mixed_shards))
    for split in index["splits"]:
        for key, members in _samples(mixed_shards, split).items():
            assert set(members) == {"jpg", "cls", "json"}, key
            meta = json.loads(members["json"])
            source = Path(meta["source"]).read_bytes()
            assert members["jpg"] == source and hashlib.sha256(source).hexdigest() == meta["sha256"]
            assert meta["format"] == ("PNG" if meta["source"].endswith(".png") else "JPEG")
    # GNU tar extracts the PNG bytes as they were (under the set's member name)
    png_key = next(k for k, m in _samples(mixed_shards, "train").items() if json.loads(m["json"])["format"] == "PNG")
    name = next(s["name"] for s in index["splits"]["train"]["shards"]
                if f"{png_key}.jpg" in tarfile.open(mixed_shards / s["name"]).getnames())
    data = subprocess.run(["tar", "-xOf", str(mixed_shards / name), f"{png_key}.jpg"], capture_output=True,
                          check=True).stdout
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == (mixed_src / f"{png_key}.png").read_bytes()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_hf_datasets_loads_every_sample_of_default_shards(mixed_shards, tmp_path):
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "hf-cache")  # (HF_DATASETS_CACHE is read when datasets is imported)
    index = load_index(str(mixed_shards))
    classes = index["classes"]
    expected = {split: _samples(mixed_shards, split) for split in index["splits"]}

    def check(rows, split):
        seen = {}
        for row in rows:
            members = expected[split][row["__key__"]]
            meta = json.loads(members["json"])
            assert row["cls"] == classes.index(meta["label"]) and isinstance(row["cls"], int)
            assert np.array_equal(np.asarray(row["jpg"].convert("RGB")), _pixels(members["jpg"]))
            assert row["json"]["format"] == meta["format"]
            seen[row["__key__"]] = True
        assert set(seen) == set(expected[split]) and len(seen) == index["splits"][split]["num_samples"]

    # 1. the folder: the dataset card names the splits and their shards
    ds = datasets.load_dataset(str(mixed_shards), cache_dir=cache)
    assert set(ds) == set(index["splits"]) == {"train", "val"}
    for split in ds:
        assert isinstance(ds[split].features["jpg"], datasets.Image)
        check(ds[split], split)
    # 2. the webdataset builder on the shard files, regular and streaming
    files = {split: [str(mixed_shards / s["name"]) for s in v["shards"]] for split, v in index["splits"].items()}
    train = datasets.load_dataset("webdataset", data_files={"train": files["train"]}, split="train", cache_dir=cache)
    check(train, "train")
    streamed = datasets.load_dataset("webdataset", data_files={"val": files["val"]}, split="val", streaming=True,
                                     cache_dir=cache)
    check(streamed, "val")
    check(datasets.load_dataset(str(mixed_shards), split="train", streaming=True, cache_dir=cache), "train")
    # the class names the card gives make cls a ClassLabel
    named = train.cast_column("cls", datasets.ClassLabel(names=classes))
    assert named.features["cls"].int2str(named[0]["cls"]) == named[0]["json"]["label"]


def test_hf_datasets_and_webdataset_read_long_member_names(long_named_shards, tmp_path):
    """GNU long-name headers (member names over 100 bytes) are read by HF datasets and webdataset.
    (wids 0.1 reads only the 100-byte name field: see docs/formats.md.)"""
    datasets = pytest.importorskip("datasets")
    import webdataset as wds

    index = load_index(str(long_named_shards))
    ds = datasets.load_dataset(str(long_named_shards), cache_dir=str(tmp_path / "hf-cache"))
    keys = {row["__key__"] for split in ds for row in ds[split]}
    assert f"eel/{'long' * 30}" in keys and len(keys) == index["totals"]["num_samples"]
    urls = [str(long_named_shards / s["name"]) for v in index["splits"].values() for s in v["shards"]]
    assert f"eel/{'long' * 30}" in {k for k, in wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__")}


def test_hf_datasets_reads_a_set_with_an_empty_shard(tmp_path):
    """A shard whose every input failed stays in index.json with 0 samples; the dataset card lists
    only shards with samples (the builder looks at the first samples of a split's first file)."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / c / f"{i}.png")
    (src / "b" / "x1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # sorted last: the last shard, alone
    (src / "b" / "x2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken too")
    out = tmp_path / "shards"
    assert vitpipe(["shard", str(src), str(out), "--val-ratio", "0", "--sample-order", "sorted",
                    "--max-samples-per-shard", "2"]) == 0
    index = load_index(str(out))
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [2, 2, 2, 2, 0]
    assert not (out / "train-000004.idx").exists()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 8 and sorted(set(ds["cls"])) == [0, 1]


def test_wids_reads_every_sample_by_index(mixed_shards, tmp_path):
    wids = pytest.importorskip("wids")
    index = load_index(str(mixed_shards))
    for split in index["splits"]:
        expected = _samples(mixed_shards, split)
        ds = wids.ShardListDataset(str(mixed_shards / f"{split}.wids.json"), cache_dir=str(tmp_path / "wids"))
        assert len(ds) == index["splits"][split]["num_samples"]
        keys = []
        for i in range(len(ds)):
            sample = ds[i]
            key = sample["__key__"]
            keys.append(key)
            assert np.array_equal(np.asarray(sample[".jpg"].convert("RGB")), _pixels(expected[key]["jpg"]))
            assert int(sample[".cls"]) == index["classes"].index(json.loads(expected[key]["json"])["label"])
        assert sorted(keys) == sorted(expected)


def test_webdataset_and_vitpipes_loader_read_the_same_samples(mixed_shards):
    import webdataset as wds

    from pipeline.loader import DataConfig, make_eval_loader

    index = load_index(str(mixed_shards))
    urls = [str(mixed_shards / s["name"]) for s in index["splits"]["train"]["shards"]]
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls"))
    assert len(rows) == index["splits"]["train"]["num_samples"]
    expected = _samples(mixed_shards, "train")
    for key, img, cls in rows:
        assert np.array_equal(np.asarray(img.convert("RGB")), _pixels(expected[key]["jpg"]))
    loader = make_eval_loader(DataConfig(shards=str(mixed_shards), image_size=16, num_workers=0), "train")
    assert sum(int(t.shape[0]) for _, t, *_ in loader) == len(rows)


def _dali():
    try:
        from nvidia import dali  # noqa: F401
    except ImportError as e:
        pytest.skip(f"NVIDIA DALI is not installed here ({e}); pip install nvidia-dali-cuda130 (the CUDA 13 build, as torch here; -cuda120 for CUDA 12)")
    from nvidia.dali import fn, pipeline_def

    return fn, pipeline_def


def test_dali_index_is_the_one_wds2idx_writes(long_named_shards, tmp_path):
    """The index the shard writer computes from what it wrote = the one read off the tar's headers
    = DALI's own wds2idx's for every shard of ordinary names. For a member name over 100 bytes
    wds2idx points at GNU tar's long-name block instead of the data; vitpipe's index is right
    there, and DALI reads that sample's bytes through it."""
    index = load_index(str(long_named_shards))
    shards = [long_named_shards / s["name"] for v in index["splits"].values() for s in v["shards"]]
    long_key = f"eel/{'long' * 30}"
    (long_shard,) = [p for p in shards if f"{long_key}.jpg" in tarfile.open(p).getnames()]
    tool = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    for shard in shards:
        text = shard.with_suffix(".idx").read_text()
        assert text == dali_index(shard) and text.startswith(f"v1.2 {len(tarfile.open(shard).getnames()) // 3}\n")
        with tarfile.open(shard) as tar:  # each offset is where tarfile finds the member's data
            offsets = {m.name: (m.offset_data, m.size) for m in tar}
        fields = [line.split() for line in text.splitlines()[1:]]
        assert {f[i + 3]: (int(f[i + 1]), int(f[i + 2])) for f in fields for i in range(0, len(f), 4)} == offsets
        if Path(tool).exists():
            subprocess.run([tool, str(shard), str(tmp_path / "theirs.idx")], check=True, capture_output=True)
            theirs = (tmp_path / "theirs.idx").read_text()
            assert (theirs == text) != (shard == long_shard), shard.name
    if not Path(tool).exists():
        pytest.skip("DALI's wds2idx is not installed (it comes with nvidia-dali): checked against tarfile only")
    fn, pipeline_def = _dali()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        image, meta = fn.readers.webdataset(paths=[str(long_shard)], index_paths=[str(long_shard.with_suffix(".idx"))],
                                            ext=["jpg", "json"], name="shard")
        return image, meta

    pipe = read()
    pipe.build()
    sources = []
    for _ in range(pipe.epoch_size("shard")):
        raw, meta = (out.at(0) for out in pipe.run())
        meta = json.loads(bytes(meta))
        assert hashlib.sha256(bytes(raw)).hexdigest() == meta["sha256"]
        sources.append(meta["source"])
    assert any(src.endswith(f"{'long' * 30}.jpg") for src in sources)


def test_dali_reads_the_shards_with_their_index_files(mixed_shards):
    """DALI's webdataset reader on the CPU (device_id=None): every sample once, the source bytes,
    decoded by DALI to the pixels PIL gives."""
    fn, pipeline_def = _dali()
    import nvidia.dali.types as types

    index = load_index(str(mixed_shards))
    shards = [s for s in index["splits"]["train"]["shards"] if s["num_samples"]]
    tars = [str(mixed_shards / s["name"]) for s in shards]
    idx = [str(mixed_shards / s["name"].replace(".tar", ".idx")) for s in shards]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0)
    def read():
        image, cls, meta = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg", "cls", "json"],
                                                 missing_component_behavior="error", name="shards")
        return image, fn.decoders.image(image, device="cpu", output_type=types.RGB), cls, meta

    pipe = read()
    pipe.build()
    total = index["splits"]["train"]["num_samples"]
    assert pipe.epoch_size("shards") == total
    seen = set()
    for _ in range(total):
        raw, pixels, cls, meta = (out.at(0) for out in pipe.run())
        meta = json.loads(bytes(meta))
        assert hashlib.sha256(bytes(raw)).hexdigest() == meta["sha256"]
        # nvImageCodec and Pillow decode PNG identically; JPEG to within their IDCTs' rounding
        diff = np.abs(np.asarray(pixels).astype(int) - _pixels(bytes(raw)).astype(int)).max()
        assert diff <= (0 if meta["format"] == "PNG" else 2), (meta["source"], diff)
        assert int(bytes(cls)) == index["classes"].index(meta["label"])
        seen.add(meta["source"])
    assert len(seen) == total


def test_verify_checks_the_wids_and_dali_indexes(mixed_shards, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(mixed_shards, out)
    assert vitpipe(["verify", str(out)]) == 0
    wids_file = out / "train.wids.json"
    spec = json.loads(wids_file.read_text())
    spec["shardlist"][0]["nsamples"] += 1
    wids_file.write_text(json.dumps(spec))
    (out / "val-000000.idx").unlink()
    idx = sorted(out.glob("train-*.idx"))[-1]
    idx.write_text(idx.read_text().replace("v1.2", "v1.2 ", 1))
    capsys.readouterr()
    assert vitpipe(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train.wids.json: does not describe the shards" in err
    assert "val-000000.idx: missing" in err and f"{idx.name}: does not match" in err
    assert "python -m pipeline.interop" in err
    subprocess.run([sys.executable, "-m", "pipeline.interop", str(out)], check=True, cwd=REPO, capture_output=True)
    assert vitpipe(["verify", str(out)]) == 0


def test_reader_files_are_deterministic_and_rewritten_on_resume(mixed_src, mixed_shards, tmp_path):
    other = tmp_path / "again"
    assert vitpipe(["shard", str(mixed_src), str(other), "--val-ratio", "0.3", "--max-samples-per-shard", "6",
                    "--workers", "2"]) == 0
    names = sorted(p.name for p in mixed_shards.iterdir() if p.is_file() and p.suffix in (".tar", ".idx", ".md")
                   or p.name.endswith(".wids.json"))
    assert names == sorted(p.name for p in other.iterdir() if p.name in names)
    for name in names:
        assert (other / name).read_bytes() == (mixed_shards / name).read_bytes(), name
    (other / "README.md").unlink()
    (other / "train.wids.json").write_text("{}")
    assert vitpipe(["shard", str(mixed_src), str(other), "--val-ratio", "0.3", "--max-samples-per-shard", "6"]) == 0
    assert (other / "README.md").read_bytes() == (mixed_shards / "README.md").read_bytes()
    assert (other / "train.wids.json").read_bytes() == (mixed_shards / "train.wids.json").read_bytes()
    assert vitpipe(["shard", str(mixed_src), str(other), "--overwrite", "--val-ratio", "0.3"]) == 0
