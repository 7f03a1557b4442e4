"""k-NN on frozen features: the vote rule, real digits through a real ViT, and 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit.evaluation.knn import extract_features, knn_evaluate, knn_predict


def _digits_batches(batch: int = 128):
    """sklearn's real digits as (images, targets, keys) batches, 32x32 grayscale: train / val lists."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    tr, va = order[:1500], order[1500:]

    def batches(idx):
        return [(x[idx[i:i + batch]], y[idx[i:i + batch]], [str(int(k)) for k in idx[i:i + batch]])
                for i in range(0, len(idx), batch)]

    return batches(tr), batches(va)


def test_k1_is_the_nearest_neighbour():
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (200,), generator=g)
    queries = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    ours = knn_predict(memory, labels, queries, num_classes=5, k=1, chunk_size=7)
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(memory, labels).predict(queries)
    assert ours.tolist() == ref.tolist()


def test_vote_is_weighted_by_similarity_not_count():
    # Two far neighbours of class 0 against one very close neighbour of class 1.
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]), dim=1)
    labels = torch.tensor([1, 0, 0])
    query = F.normalize(torch.tensor([[1.0, 0.01]]), dim=1)
    assert knn_predict(memory, labels, query, num_classes=2, k=3, temperature=0.07).item() == 1
    # With a huge temperature every neighbour weighs the same, so the majority (class 0) wins.
    assert knn_predict(memory, labels, query, num_classes=2, k=3, temperature=1e6).item() == 0


def test_bad_arguments_name_the_value():
    m = F.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match="k=0"):
        knn_predict(m, torch.zeros(4, dtype=torch.long), m, num_classes=2, k=0)
    with pytest.raises(ValueError, match="temperature=0"):
        knn_predict(m, torch.zeros(4, dtype=torch.long), m, num_classes=2, temperature=0)


def test_real_digits_through_an_untrained_vit_beat_chance_by_far():
    from vit.models.vit import create_model

    torch.manual_seed(0)
    model = create_model("micro/4", in_chans=1, num_classes=0)  # a backbone without a head
    train, val = _digits_batches()
    feats, labels = extract_features(model, val)
    assert feats.shape == (297, 64) and torch.allclose(feats.norm(dim=1), torch.ones(297), atol=1e-5)
    assert model.training  # the caller's mode is restored
    res = knn_evaluate(model, train, val, num_classes=10, ks=(1, 20))
    assert res["knn_num_queries"] == 297 and res["knn_memory_size"] == 1500
    # A random ViT keeps some of the pixel geometry in its class token: well above chance (0.1).
    assert 0.3 < res["knn_top1_k20"] <= 1.0, res


def test_a_k_above_the_memory_size_is_said(capsys):
    from vit.models.vit import create_model

    torch.manual_seed(0)
    model = create_model("micro/4", in_chans=1, num_classes=0)
    train, val = _digits_batches()
    res = knn_evaluate(model, train[:1], val[:1], num_classes=10, ks=(5, 5000), progress=True)
    n = res["knn_memory_size"]
    assert f"k=5000 is more than the {n} memory samples" in capsys.readouterr().err


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    from vit.models.vit import create_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = create_model("micro/4", in_chans=1, num_classes=0)
        train, val = _digits_batches(batch=100)
        # Each rank holds a different, uneven part of both splits, like shards split by rank.
        res = knn_evaluate(model, train[rank::world], val[rank::world], num_classes=10, ks=(5,))
        queue.put((rank, res))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_give_the_single_process_result():
    from vit.train.distributed import free_port
    from vit.models.vit import create_model

    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_rank_main, args=(2, free_port(), queue), nprocs=2,
                                          start_method="spawn", join=True)
    got = dict(queue.get() for _ in range(2))
    torch.manual_seed(0)
    model = create_model("micro/4", in_chans=1, num_classes=0)
    train, val = _digits_batches(batch=100)
    ref = knn_evaluate(model, train, val, num_classes=10, ks=(5,))
    for rank in (0, 1):
        assert got[rank]["knn_num_queries"] == 297 and got[rank]["knn_memory_size"] == 1500
        assert got[rank]["knn_top1_k5"] == pytest.approx(ref["knn_top1_k5"])
