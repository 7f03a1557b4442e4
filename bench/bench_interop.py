"""What the other readers' files (HF dataset card, wids and DALI indexes) add to a shard run.

    .venv/bin/python bench/bench_interop.py --repeats 5

Shards the same collection with the reader files written (the default) and with their writer
stubbed out, taking turns, and reports the median of each and their ratio. Two collections:
scikit-learn's digits as 32 px PNGs (tiny images: the per-sample costs dominate, the worst case)
and 1500 photo crops of 384 px as JPEG (bench_shard.py's pass-through set). Inputs are read from
the page cache; each run's output is deleted before the next, untimed.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _photos(root: Path, n: int) -> Path:
    from PIL import Image
    from skimage import data

    src = root / "photos" / "all"
    src.mkdir(parents=True)
    images = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea")]
    for i in range(n):
        img = images[i % len(images)]
        x, y = (i * 37) % (img.width - 384), (i * 53) % (img.height - 384)
        buf = io.BytesIO()
        img.crop((x, y, x + 384, y + 384)).save(buf, "JPEG", quality=90)
        (src / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    return src.parent


def _time(src: Path, out: Path, with_files: bool) -> float:
    import pipeline.run as writer
    import pipeline.shard as stage
    from pipeline.shard import ShardConfig, shard

    real = stage.write_reader_files, writer.write_dali_index
    if not with_files:  # the card and wids indexes at the end, the DALI index per shard written
        stage.write_reader_files, writer.write_dali_index = (lambda *a, **k: []), (lambda *a, **k: None)
    try:
        start = time.perf_counter()
        shard(ShardConfig(src=str(src), out=str(out), val_ratio=0.1, max_samples_per_shard=1000))
        return time.perf_counter() - start
    finally:
        stage.write_reader_files, writer.write_dali_index = real
        shutil.rmtree(out)


def _components(src: Path, out: Path, repeats: int) -> tuple[float, float]:
    """Seconds for the DALI indexes (from the members' names and sizes, as the shard writer does)
    and for the dataset card + wids indexes of the whole set, medians of `repeats`."""
    import json
    import tarfile

    from pipeline.interop import dali_index_of_members, write_reader_files
    from pipeline.shard import ShardConfig, shard

    shard(ShardConfig(src=str(src), out=str(out), val_ratio=0.1, max_samples_per_shard=1000))
    index = json.loads((out / "index.json").read_text())
    layouts = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = [(m.name, m.size) for m in tar]
        layouts.append([members[i:i + 3] for i in range(0, len(members), 3)])
    dali, card = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for layout in layouts:
            dali_index_of_members(layout)
        dali.append(time.perf_counter() - start)
        start = time.perf_counter()
        write_reader_files(out, index)
        card.append(time.perf_counter() - start)
    shutil.rmtree(out)
    return statistics.median(dali), statistics.median(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photos", type=int, default=1500)
    args = parser.parse_args()
    from pipeline.packaged_data import write_digits

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = {"digits, 1797 PNGs of 32 px": write_digits(root / "digits", size=32),
                f"photos, {args.photos} JPEGs of 384 px": _photos(root, args.photos)}
        parts = []
        print("| collection | shard without reader files | with them (default) | ratio | per sample |")
        print("| --- | --- | --- | --- | --- |")
        for name, src in sets.items():
            n = sum(1 for p in src.rglob("*") if p.is_file())
            times = {True: [], False: []}
            _time(src, root / "out", True)  # warm the page cache and the imports
            for _ in range(args.repeats):
                for with_files in (False, True):
                    times[with_files].append(_time(src, root / "out", with_files))
            base, cand = statistics.median(times[False]), statistics.median(times[True])
            print(f"| {name} | {base:.3f} s | {cand:.3f} s | {cand / base:.2f}x | "
                  f"+{(cand - base) / n * 1e6:.0f} us |")
            parts.append((name, n, base, _components(src, root / "out", args.repeats)))
        # The end-to-end difference drowns in a loaded machine's noise: the parts, timed alone.
        print("\n| collection | DALI index from the members written | card + wids indexes | of the shard time |")
        print("| --- | --- | --- | --- |")
        for name, n, base, (dali_s, card_s) in parts:
            print(f"| {name} | {dali_s / n * 1e6:.1f} us/sample | {card_s / n * 1e6:.1f} us/sample | "
                  f"{(dali_s + card_s) / base:.1%} |")


if __name__ == "__main__":
    main()
