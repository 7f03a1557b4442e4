"""Shards in object storage: a real S3-compatible server (moto_server on 127.0.0.1), real s3fs.

Configuration is what a user sets for MinIO/Ceph/S3: AWS_* credentials and fsspec's
`FSSPEC_S3_ENDPOINT_URL` in the environment (read by subprocesses), mirrored into
`fsspec.config.conf` for this process (fsspec reads the environment once, at import).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.object_store import upload_shard_set
from vit.train.distributed import free_port
from vitpipe.errors import UserError

BUCKET = "vitpipe-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An empty bucket on a fresh moto S3 server; yields the s3fs filesystem."""
    import fsspec

    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.skip("moto_server not installed: pip install 'moto[server]'")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    saved_env = {k: os.environ.get(k) for k in [*CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL"]}
    saved_conf = fsspec.config.conf.get("s3")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.2)
        os.environ.update(CREDENTIALS, FSSPEC_S3_ENDPOINT_URL=endpoint)
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        fsspec.filesystem("s3").clear_instance_cache()


def _vitpipe(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process: it sees only the environment's S3 settings."""
    return subprocess.run([sys.executable, "-m", "vitpipe.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_shard_set_round_trip(s3, digits_shards):
    url = f"s3://{BUCKET}/digits"
    copied = upload_shard_set(digits_shards, url)
    local_index = json.loads((digits_shards / "index.json").read_text())
    assert copied == local_index["totals"]["num_bytes"]

    # Every shard arrived byte for byte, and the index came along.
    for split in local_index["splits"].values():
        for entry in split["shards"]:
            assert s3.cat_file(f"{BUCKET}/digits/{entry['name']}") == (digits_shards / entry["name"]).read_bytes()
    res = _vitpipe("verify", url)
    assert res.returncode == 0, res.stdout + res.stderr

    # The training loader reads its batches straight from the bucket.
    from pipeline.loader import DataConfig, make_train_loader

    loader = make_train_loader(DataConfig(shards=url, channels=1, mean=(0.5,), std=(0.5,), image_size=32,
                                          batch_size=16, num_workers=0, shuffle_buffer=0))
    loader.set_epoch(0)
    images, labels = next(iter(loader))[:2]
    assert tuple(images.shape) == (16, 1, 32, 32)
    assert labels.min() >= 0 and labels.max() < len(local_index["classes"])


def test_verify_catches_a_damaged_object(s3, digits_shards):
    url = f"s3://{BUCKET}/damaged"
    upload_shard_set(digits_shards, url)
    name = json.loads((digits_shards / "index.json").read_text())["splits"]["train"]["shards"][1]["name"]
    data = s3.cat_file(f"{BUCKET}/damaged/{name}")
    s3.pipe_file(f"{BUCKET}/damaged/{name}", data[: len(data) // 2])
    res = _vitpipe("verify", url)
    assert res.returncode != 0
    assert name in res.stdout + res.stderr


def test_reupload_drops_the_old_index_first(s3, digits_shards, tmp_path):
    """An interrupted re-upload must not leave the previous index pointing at new shards."""
    url = f"s3://{BUCKET}/again"
    upload_shard_set(digits_shards, url)
    broken = tmp_path / "broken"
    shutil.copytree(digits_shards, broken)
    first = json.loads((broken / "index.json").read_text())["splits"]["train"]["shards"][0]["name"]
    (broken / first).unlink()
    with pytest.raises(UserError, match=first):
        upload_shard_set(broken, url)
    assert s3.exists(f"{BUCKET}/again/index.json")  # refused before touching the destination
    with pytest.raises(UserError, match="no shard index"):
        upload_shard_set(tmp_path / "nothing-here", url)


def test_shard_stage_reads_sources_from_s3(s3, digits_dir, tmp_path):
    """A manifest and its images in a bucket shard to the same samples as the same files on disk."""
    files = sorted(digits_dir.glob("*/*.png"))[::30]  # 60 images over the 10 classes
    rows = [{"key": f"d{p.parent.name}_{p.stem}", "path": f"{p.parent.name}/{p.name}", "label": p.parent.name}
            for p in files]
    manifest = io.StringIO()
    writer = csv.DictWriter(manifest, fieldnames=["key", "path", "label"])
    writer.writeheader()
    writer.writerows(rows)
    local_src = tmp_path / "src"
    for p in files:
        (local_src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, local_src / p.parent.name / p.name)
        s3.put_file(str(p), f"{BUCKET}/raw/{p.parent.name}/{p.name}")
    (local_src / "manifest.csv").write_text(manifest.getvalue())
    s3.pipe_file(f"{BUCKET}/raw/manifest.csv", manifest.getvalue().encode())

    outs = {}
    for name, src in (("local", str(local_src / "manifest.csv")), ("s3", f"s3://{BUCKET}/raw/manifest.csv")):
        outs[name] = tmp_path / f"out-{name}"
        res = _vitpipe("shard", src, str(outs[name]), "--max-samples-per-shard", "25")
        assert res.returncode == 0, res.stdout + res.stderr

    local_index = json.loads((outs["local"] / "index.json").read_text())
    s3_index = json.loads((outs["s3"] / "index.json").read_text())
    assert s3_index["totals"]["num_samples"] == local_index["totals"]["num_samples"] == len(files)
    assert s3_index["totals"]["num_failures"] == 0
    for split, entry in local_index["splits"].items():
        for shard in entry["shards"]:
            a = _members((outs["local"] / shard["name"]).read_bytes())
            b = _members((outs["s3"] / shard["name"]).read_bytes())
            assert a.keys() == b.keys()
            for member in a:
                if member.endswith(".json"):  # records where it came from: the path differs
                    ja, jb = json.loads(a[member]), json.loads(b[member])
                    assert jb["source"].startswith(f"s3://{BUCKET}/raw/")
                    assert {**ja, "source": None} == {**jb, "source": None}
                else:
                    assert a[member] == b[member], f"{shard['name']}:{member} differs"
