"""Metrics against scikit-learn's reference implementations, and exactness across real gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from vit.evaluation.metrics import ClassificationMetrics, confusion_matrix, per_class_metrics, topk_correct


def _data(n: int = 300, c: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n,), generator=g)
    # Logits correlated with the targets, so accuracy is neither 0 nor 1.
    logits = torch.randn(n, c, generator=g) + 1.5 * F.one_hot(targets, c)
    return logits, targets


def test_topk_correct_matches_manual_count():
    logits, targets = _data()
    got = topk_correct(logits, targets, ks=(1, 3, 5, 50))
    assert set(got) == {1, 3, 5}  # k beyond the class count is meaningless and skipped
    order = logits.argsort(dim=1, descending=True)
    for k in (1, 3, 5):
        expected = sum(int(t in row[:k].tolist()) for row, t in zip(order, targets))
        assert got[k] == expected
    assert got[1] == int((logits.argmax(1) == targets).sum())
    assert got[1] < got[3] < got[5] <= len(targets)


def test_confusion_matrix_and_per_class_match_sklearn():
    logits, targets = _data(c=6)
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, targets, 6)
    assert cm.tolist() == skm.confusion_matrix(targets, preds, labels=range(6)).tolist()
    pc = per_class_metrics(cm)
    p, r, f, s = skm.precision_recall_fscore_support(targets, preds, labels=range(6), zero_division=0)
    assert pc["precision"] == pytest.approx(p.tolist())
    assert pc["recall"] == pytest.approx(r.tolist())
    assert pc["f1"] == pytest.approx(f.tolist())
    assert pc["support"] == s.tolist()


def test_undefined_precision_is_zero_not_nan():
    # Class 2 never predicted and never present: all its numbers are 0, none NaN.
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    pc = per_class_metrics(cm)
    assert pc["precision"][2] == 0.0 and pc["recall"][2] == 0.0 and pc["f1"][2] == 0.0
    assert pc["precision"][1] == pytest.approx(0.5)


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0)


def test_accumulator_batches_equal_one_shot_and_skip_unlabelled():
    logits, targets = _data(n=257, c=10)
    targets_with_unlabelled = targets.clone()
    targets_with_unlabelled[::10] = -1
    acc = ClassificationMetrics(10)
    for lo in range(0, 257, 32):  # uneven last batch
        acc.update(logits[lo:lo + 32], targets_with_unlabelled[lo:lo + 32])
    res = acc.compute([f"c{i}" for i in range(10)])

    keep = targets_with_unlabelled >= 0
    ref_logits, ref_t = logits[keep], targets[keep]
    assert res["num_samples"] == int(keep.sum()) and res["num_unlabelled"] == int((~keep).sum())
    assert res["loss"] == pytest.approx(float(F.cross_entropy(ref_logits, ref_t)), rel=1e-5)
    assert res["top1"] == pytest.approx(skm.accuracy_score(ref_t, ref_logits.argmax(1)))
    assert res["top5"] == pytest.approx(skm.top_k_accuracy_score(ref_t, ref_logits, k=5, labels=range(10)))
    assert res["macro_f1"] == pytest.approx(skm.f1_score(ref_t, ref_logits.argmax(1), average="macro"))
    assert res["per_class"]["c3"]["support"] == int((ref_t == 3).sum())
    assert sum(map(sum, res["confusion_matrix"]["counts"])) == res["num_samples"]


def test_no_top5_below_five_classes_and_clear_errors():
    acc = ClassificationMetrics(3)
    acc.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    res = acc.compute()
    assert "top1" in res and "top5" not in res
    with pytest.raises(ValueError, match="outputs 4 classes but the split has 3"):
        acc.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes=0"):
        ClassificationMetrics(0)


def _rank_main(rank: int, world: int, port: int, parts, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc = ClassificationMetrics(7)
        logits, targets = parts[rank]
        acc.update(logits, targets)
        acc.reduce()
        queue.put((rank, acc.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_reduce_over_two_gloo_ranks_counts_each_sample_once():
    from vit.train.distributed import free_port

    logits, targets = _data(n=301, c=7, seed=3)
    # Unequal shares, as with a split whose shards do not divide evenly over ranks.
    parts = [(logits[:190], targets[:190]), (logits[190:], targets[190:])]
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_rank_main, args=(2, free_port(), parts, queue), nprocs=2,
                                          start_method="spawn", join=True)
    got = dict(queue.get() for _ in range(2))
    ref = ClassificationMetrics(7)
    ref.update(logits, targets)
    ref = ref.compute()
    for rank in (0, 1):
        res = got[rank]
        assert res["num_samples"] == 301
        assert res["confusion_matrix"]["counts"] == ref["confusion_matrix"]["counts"]
        assert res["top1"] == pytest.approx(ref["top1"]) and res["top5"] == pytest.approx(ref["top5"])
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6)
