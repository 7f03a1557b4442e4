"""vit/models/vit.py: shapes of every preset, the paper's architecture choices, and the model's methods."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vit.models.vit
from vit.models.vit import PRESETS, VisionTransformer, ViTConfig, create_model, preset_config
from vitpipe.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return create_model("micro/4", **{"depth": 2, "image_size": 16, **overrides})


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_runs_at_small_size(name):
    """Full width and heads of each preset, one block, a 2x3 patch grid: seconds for all of them."""
    cfg = PRESETS[name]
    model = create_model(name, depth=1, image_size=2 * cfg["patch_size"], num_classes=7)
    x = torch.randn(2, 3, 2 * cfg["patch_size"], 2 * cfg["patch_size"])
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
    assert tokens.shape == (2, 1 + 4, cfg["embed_dim"])
    assert logits.shape == (2, 7)
    assert model.cfg.embed_dim // model.cfg.num_heads in (16, 64, 80), "presets keep kernel-friendly head widths"


def test_paper_sizes():
    """Table 1 of the paper: Base 86M, Large 307M, Huge 632M parameters (at 224, 1000 classes)."""
    expected = {"b/16": 86e6, "l/16": 304e6, "h/14": 632e6}
    for name, params in expected.items():
        cfg = preset_config(name)
        n = cfg.depth * (12 * cfg.embed_dim ** 2)  # dominant term; checks depth/width, not the whole count
        assert abs(n - params) / params < 0.05, name
    assert preset_config("b/16").grid_size == (14, 14)
    assert preset_config("h/14").grid_size == (16, 16)


def test_num_params_matches_timm_and_counts_embeddings():
    timm = pytest.importorskip("timm")
    from vit.models.weights import timm_model_kwargs

    cfg = preset_config("s/16", depth=2)
    ours = VisionTransformer(cfg)
    theirs = timm.models.vision_transformer.VisionTransformer(**timm_model_kwargs(cfg))
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() - ours.num_params(exclude_embeddings=True) == ours.pos_embed.numel() + cfg.embed_dim


def test_features_pooling_and_heads():
    x = torch.randn(3, 3, 16, 16)
    model = tiny(num_classes=0)
    assert model(x).shape == (3, 64), "num_classes=0 returns the pooled features"
    tokens = model.forward_features(x)
    assert torch.equal(model.forward_head(tokens), tokens[:, 0])

    avg = tiny(global_pool="avg", fc_norm=False)
    tokens = avg.forward_features(x)
    assert torch.allclose(avg.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    # global_pool='avg' alone means what it means in timm: the final norm moves after pooling
    timm_like = tiny(global_pool="avg")
    assert timm_like.cfg.fc_norm and isinstance(timm_like.norm, torch.nn.Identity)
    tokens = timm_like.forward_features(x)
    assert torch.allclose(timm_like.forward_head(tokens, pre_logits=True), timm_like.fc_norm(tokens[:, 1:].mean(1)))

    rep = tiny(representation_size=32, num_classes=5)
    assert rep.forward_head(rep.forward_features(x), pre_logits=True).shape == (3, 32)
    assert rep(x).shape == (3, 5)
    pooled = rep.forward_head(rep.forward_features(x), pre_logits=True)
    assert pooled.abs().max() <= 1.0, "the pretraining hidden layer is tanh"


def test_without_a_class_token_only_patch_tokens_are_pooled():
    """class_token=False (timm's option): no cls_token parameter, N tokens, mean pooling; resizing
    and a new head keep working, and token pooling is refused with the way out."""
    x = torch.randn(2, 3, 16, 16)
    model = tiny(class_token=False, global_pool="avg", num_classes=4)
    assert model.cls_token is None and "cls_token" not in model.state_dict()
    assert model.pos_embed.shape == (1, 16, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 64)
    assert model.cfg.fc_norm is True, "as in timm, mean pooling defaults to a LayerNorm after pooling"
    assert torch.equal(model.forward_head(tokens, pre_logits=True), model.fc_norm(tokens.mean(dim=1)))
    assert model(x).shape == (2, 4)
    model.set_image_size(24)
    assert model.pos_embed.shape == (1, 36, 64) and model(torch.randn(1, 3, 24, 24)).shape == (1, 4)
    with pytest.raises(UserError, match="class_token=False has none; set global_pool='avg'"):
        ViTConfig(class_token=False)
    with pytest.raises(UserError, match="this model has none"):
        model.reset_classifier(3, global_pool="token")


def test_init_zero_head_and_truncated_normal():
    model = create_model("s/16", depth=2)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    w = model.blocks[0].mlp.fc1.weight
    # timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. hardly at all: std stays 0.02
    assert abs(w.std().item() - 0.02) < 0.0005 and torch.all(model.blocks[0].mlp.fc1.bias == 0)
    assert 0.015 < model.pos_embed.std() < 0.025
    assert model.cls_token.abs().max() < 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 30}, "image_size=30"),
    ({"embed_dim": 100, "num_heads": 3}, "num_heads=3"),
    ({"global_pool": "max"}, "global_pool='max'"),
    ({"drop_path_rate": 1.0}, "drop_path_rate=1.0"),
    ({"widht": 3}, "widht"),
])
def test_bad_config_names_the_value(overrides, message):
    with pytest.raises(UserError, match=message):
        create_model("micro/4", **overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(UserError, match=r"unknown model 'b/15'.*b/16"):
        create_model("b/15")
    assert create_model("ViT-Micro/4").cfg == preset_config("micro/4")


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    cfg = preset_config("ti/4", representation_size=0)
    assert cfg.representation_size is None, "0 and None both mean no pre-logits layer"
    assert ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="colour"):
        ViTConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_attention_goes_through_sdpa(monkeypatch):
    """SDPA is what gives flash/memory-efficient kernels on GPUs; a hand-written softmax would not."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    tiny()(torch.randn(2, 3, 16, 16))
    assert calls == [(2, 4, 1 + 16, 16)] * 2, "one SDPA call per block with (batch, heads, tokens, head_dim)"


def test_new_head_trains_one_step():
    torch.manual_seed(0)
    model = tiny(num_classes=10)
    model.reset_classifier(3)
    assert model.cfg.num_classes == 3 and model.head.out_features == 3
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    backbone = model.blocks[0].attn.qkv.weight.detach().clone()
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(3.0)).item()) < 1e-5, "a zero head starts at uniform logits"
    assert losses[1] < losses[0]
    assert not torch.equal(model.blocks[0].attn.qkv.weight, backbone), "the backbone trains once the head is non-zero"


def test_reset_classifier_drops_the_pretraining_hidden_layer():
    model = tiny(representation_size=32, num_classes=100)
    model.reset_classifier(4, global_pool="avg")
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.in_features == 64
    assert (model.cfg.num_classes, model.cfg.representation_size, model.cfg.global_pool) == (4, None, "avg")
    kept = tiny(representation_size=32, num_classes=100)
    kept.reset_classifier(4, keep_pre_logits=True)
    assert kept.head.in_features == 32 and kept.cfg.representation_size == 32
    with pytest.raises(UserError, match="global_pool='map'"):
        model.reset_classifier(4, global_pool="map")


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(num_classes=5)
    torch.nn.init.normal_(model.head.weight)  # a zero head would make every backbone gradient zero
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        assert plain[k].abs().sum() > 0, k
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_set_image_size_resamples_and_keeps_the_class_token():
    model = tiny()
    old = model.pos_embed.detach().clone()
    model.set_image_size(24)
    assert model.cfg.image_size == 24 and model.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(model.pos_embed[:, 0], old[:, 0])
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)
    assert "pos_embed" in dict(model.named_parameters()), "still a trainable parameter"
    with pytest.raises(ValueError, match=r"16x16 .* 24x24.*set_image_size\(16\)"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(UserError, match="image_size=30"):
        model.set_image_size(30)


def test_stochastic_depth_and_dropout_only_in_training():
    model = tiny(drop_path_rate=0.5, drop_rate=0.1)
    torch.nn.init.normal_(model.head.weight)
    assert [b.drop_path_rate for b in model.blocks] == [0.0, 0.5], "linear rule: 0 at the first block"
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_no_weight_decay_names_real_parameters():
    model = tiny()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys()


def test_flops_match_pytorch_flop_counter():
    """Forward FLOPs equal what torch counts (math attention, so QK^T and AV are visible matmuls)."""
    model = tiny(representation_size=32)
    x = torch.randn(2, 3, 16, 16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 2 * model.flops_per_image()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    # backward is 2x forward except for the image gradient of the patch conv, which nobody needs
    assert abs(counter.get_total_flops() / (2 * model.flops_per_image(training=True)) - 1) < 0.05
    # ViT-B/16 at 224: the widely quoted 17.6 GMACs per image, 105 GFLOP per training image
    b16 = create_model("b/16")
    assert abs(b16.flops_per_image() / 2e9 - 17.6) < 0.1
    assert abs(b16.flops_per_image(training=True) / 1e9 - 105) < 1


def test_model_file_imports_only_torch_and_stdlib():
    tree = ast.parse(Path(vit.models.vit.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    tops = {m.split(".")[0] for m in modules}
    assert tops <= {"__future__", "dataclasses", "math", "typing", "torch", "vitpipe"}, tops
    assert not any(m.startswith("torch.distributed") for m in modules)
    assert {m for m in modules if m.startswith("vitpipe")} <= {"vitpipe.errors"}, "only the stdlib-only UserError"


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """The one-shot GPU script, at toy size on the CPU, so it cannot rot before its GPU run."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--dtype", "fp32",
         "--preset", "micro/4", "--image-size", "16", "--batch", "4", "--steps", "2", "--warmup", "1",
         "--no-compile"],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ours"]["step_ms"] > 0 and result["images_per_s"] > 0
    assert result["flops_per_image_train"] == tiny(image_size=16, depth=4).flops_per_image(training=True)
    assert result["mfu"] is None, "no peak FLOP/s for a CPU"
