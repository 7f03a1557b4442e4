"""vit/models/weights.py: our safetensors format, timm checkpoints both ways, position-embedding resampling."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from vit.models.vit import VisionTransformer, ViTConfig
from vit.models.weights import (config_from_timm, load_pretrained, load_timm_checkpoint, resample_pos_embed,
                         save_pretrained, timm_model_kwargs, timm_to_vitpipe, vitpipe_to_timm)
from vitpipe.errors import UserError

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

SMALL = ViTConfig(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, heads and norms included, so equal outputs mean equal weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0))
    return model.eval()


def images(cfg: ViTConfig, n: int = 3) -> torch.Tensor:
    return torch.randn(n, cfg.in_chans, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# resample_pos_embed


def test_resample_to_the_same_grid_is_the_identity():
    pe = torch.randn(1, 1 + 6 * 4, 8)
    assert torch.equal(resample_pos_embed(pe, (6, 4), old_grid=(6, 4)), pe)
    square = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resample_pos_embed(square, (4, 4)), square)


def test_resample_interpolates_the_grid_and_keeps_prefix_tokens():
    """Bicubic reproduces a linear ramp exactly away from the borders; rows and columns stay apart."""
    old_h, old_w, new_h, new_w = 8, 10, 12, 16
    rows = torch.arange(old_h, dtype=torch.float32)[:, None].expand(old_h, old_w)
    cols = torch.arange(old_w, dtype=torch.float32)[None, :].expand(old_h, old_w)
    grid = torch.stack([rows, cols], dim=-1).reshape(1, old_h * old_w, 2)
    prefix = torch.tensor([[[7.0, -7.0], [3.0, 3.0]]])
    out = resample_pos_embed(torch.cat([prefix, grid], 1), (new_h, new_w), num_prefix_tokens=2,
                             old_grid=(old_h, old_w))
    assert out.shape == (1, 2 + new_h * new_w, 2)
    assert torch.equal(out[:, :2], prefix)
    new = out[0, 2:].reshape(new_h, new_w, 2)
    for i in range(3, new_h - 3):
        for j in range(3, new_w - 3):
            expect = torch.tensor([(i + 0.5) * old_h / new_h - 0.5, (j + 0.5) * old_w / new_w - 0.5])
            torch.testing.assert_close(new[i, j], expect, atol=1e-4, rtol=0)


def test_resample_rejects_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4))
    with pytest.raises(ValueError, match=r"old_grid=\(3, 5\)"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4), old_grid=(3, 5))


# ---------------------------------------------------------------------------------------------
# timm equivalence


@pytest.mark.parametrize("changes", [
    {},
    {"global_pool": "avg"},
    {"global_pool": "avg", "fc_norm": True},
    {"qkv_bias": False, "mlp_ratio": 2.0, "in_chans": 1},
    {"num_classes": 0},
    {"class_token": False, "global_pool": "avg"},
])
def test_timm_weights_give_the_same_logits_both_ways(changes):
    cfg = dataclasses.replace(SMALL, **changes)
    x = images(cfg)
    theirs = randomized(TimmViT(**timm_model_kwargs(cfg)), seed=1)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(timm_to_vitpipe(theirs.state_dict(), cfg))  # strict: every key accounted for
    with torch.no_grad():
        expected = theirs(x)
        assert expected.abs().max() > 0.1, "a trivial (zero) output would prove nothing"
        assert (ours(x) - expected).abs().max() < 1e-5
        assert (ours.forward_features(x) - theirs.forward_features(x)).abs().max() < 1e-5

    ours = randomized(VisionTransformer(cfg), seed=2)
    theirs = TimmViT(**timm_model_kwargs(cfg)).eval()
    theirs.load_state_dict(vitpipe_to_timm(ours.state_dict(), cfg))
    with torch.no_grad():
        expected = ours(x)
        assert (theirs(x) - expected).abs().max() < 1e-5


def test_config_from_timm_reads_the_architecture():
    cfg = dataclasses.replace(SMALL, global_pool="avg", qkv_bias=False)
    assert config_from_timm(TimmViT(**timm_model_kwargs(cfg))) == cfg
    b16 = config_from_timm("vit_base_patch16_384.augreg_in21k_ft_in1k")
    assert (b16.embed_dim, b16.depth, b16.patch_size, b16.image_size) == (768, 12, 16, 384)
    assert config_from_timm("vit_small_patch32_224").num_heads == 6
    with pytest.raises(UserError, match="vit_giant_whatever"):
        config_from_timm("vit_giant_whatever")
    with pytest.raises(UserError, match="register tokens"):
        config_from_timm(TimmViT(**timm_model_kwargs(SMALL), reg_tokens=4))


def test_timm_features_we_do_not_implement_are_named():
    theirs = TimmViT(**timm_model_kwargs(SMALL), init_values=1e-5, qk_norm=True)
    with pytest.raises(UserError, match=r"layer scale.*qk_norm.*blocks\.0\.attn\.q_norm\.weight"):
        timm_to_vitpipe(theirs.state_dict(), SMALL)


def test_wrapped_prefixed_and_old_layout_checkpoints_convert():
    theirs = randomized(TimmViT(**timm_model_kwargs(SMALL)))
    sd = {f"module.{k}": v for k, v in theirs.state_dict().items()}
    w = sd["module.patch_embed.proj.weight"]
    sd["module.patch_embed.proj.weight"] = w.reshape(w.shape[0], -1)  # pre-conv timm: Linear on flat patches
    converted = timm_to_vitpipe({"model": sd, "epoch": 3}, SMALL)
    for k, v in theirs.state_dict().items():
        assert torch.equal(converted[k], v), k


def test_vitpipe_to_timm_refuses_a_pre_logits_layer():
    cfg = dataclasses.replace(SMALL, representation_size=24)
    with pytest.raises(UserError, match="representation_size=24.*reset_classifier"):
        vitpipe_to_timm(VisionTransformer(cfg).state_dict(), cfg)


# ---------------------------------------------------------------------------------------------
# Our format: save_pretrained / load_pretrained


def test_save_and_load_round_trip(tmp_path):
    model = randomized(VisionTransformer(dataclasses.replace(SMALL, representation_size=24)))
    out = save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "vitpipe.vit" and config["representation_size"] == 24
    x = images(SMALL)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(load_pretrained(out).eval()(x), expected)
        (out / "config.json").unlink()  # the weights file alone carries the config in its header
        loaded = load_pretrained(out / "model.safetensors").eval()
        assert torch.equal(loaded(x), expected) and loaded.cfg == model.cfg


def test_class_names_travel_with_the_export_until_the_head_changes(tmp_path):
    from vit.models.weights import read_class_names
    from vitpipe.errors import UserError

    model = randomized(VisionTransformer(SMALL))
    names = [f"class-{i}" for i in range(SMALL.num_classes)]
    model.class_names = names
    out = save_pretrained(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["class_names"] == names
    assert read_class_names(out) == names and load_pretrained(out).class_names == names
    (out / "config.json").unlink()  # also in the safetensors header
    assert load_pretrained(out / "model.safetensors").class_names == names
    # a new head (fine-tuning on other classes) has no names until it is trained and exported again
    assert load_pretrained(out, num_classes=SMALL.num_classes + 1).class_names is None
    model.reset_classifier(SMALL.num_classes)
    assert model.class_names is None
    assert read_class_names(save_pretrained(model, tmp_path / "unnamed")) is None
    model.class_names = names[:-1]
    with pytest.raises(UserError, match="class_names has .* names for a head of"):
        save_pretrained(model, tmp_path / "bad")


def test_load_at_a_new_resolution_resamples_pos_embed(tmp_path):
    model = randomized(VisionTransformer(SMALL))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, image_size=48)
    assert loaded.cfg.image_size == 48 and loaded.pos_embed.shape == (1, 1 + 36, 48)
    model.set_image_size(48)
    assert torch.equal(loaded.pos_embed, model.pos_embed)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images(loaded.cfg)), model.eval()(images(loaded.cfg)))


def test_load_with_another_class_count_gets_a_fresh_head_and_says_so(tmp_path, caplog):
    model = randomized(VisionTransformer(SMALL))
    save_pretrained(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="vit.models.weights"):
        loaded = load_pretrained(tmp_path, num_classes=3)
    assert "head has 5 classes" in caplog.text and "fresh" in caplog.text
    assert loaded.head.out_features == 3 and torch.count_nonzero(loaded.head.weight) == 0
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)


def test_mismatched_checkpoint_lists_the_offending_keys(tmp_path):
    save_pretrained(VisionTransformer(SMALL), tmp_path)
    wider = dataclasses.replace(SMALL, embed_dim=64)
    with pytest.raises(UserError, match=r"wrong shapes: .*cls_token: .* \(1, 1, 48\) vs model \(1, 1, 64\)"):
        load_pretrained(tmp_path, config=wider)

    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["blocks.1.norm2.weight"], sd["head.bias"]
    sd["extra.weight"] = torch.zeros(2)
    partial = tmp_path / "elsewhere" / "partial.safetensors"
    partial.parent.mkdir()
    save_file(sd, str(partial))  # no config.json beside it, none in its header
    with pytest.raises(UserError, match="carries no vitpipe config"):
        load_pretrained(partial)
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.norm2\.weight, head\.bias.*unexpected keys: "
                                        r"extra\.weight"):
        load_pretrained(partial, config=SMALL)
    loose = load_pretrained(partial, config=SMALL, strict=False)
    assert torch.equal(loose.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_named_architecture_takes_the_files_head_size(tmp_path):
    """config= names an architecture, not a label set: a timm file with a 7-class head loads with
    config=SMALL (5 classes) as a 7-class model, and num_classes= still replaces the head."""
    theirs = randomized(TimmViT(**timm_model_kwargs(dataclasses.replace(SMALL, num_classes=7))))
    path = tmp_path / "vit.pth"
    torch.save(theirs.state_dict(), path)
    loaded = load_pretrained(path, config=SMALL)
    assert loaded.cfg.num_classes == 7 and torch.equal(loaded.head.weight, theirs.head.weight)
    assert load_pretrained(path, config=SMALL, num_classes=3).cfg.num_classes == 3
    assert load_pretrained(path, config=dataclasses.replace(SMALL, num_classes=0)).cfg.num_classes == 0
    backbone = {k: v for k, v in theirs.state_dict().items() if not k.startswith("head.")}
    torch.save(backbone, tmp_path / "backbone.pth")  # a file without a head loads as features only
    assert load_pretrained(tmp_path / "backbone.pth", config=SMALL).cfg.num_classes == 0
    assert load_pretrained(tmp_path / "backbone.pth", config=SMALL, num_classes=4).cfg.num_classes == 4


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="has no model.safetensors"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# timm checkpoint files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_timm_checkpoint_files(tmp_path, suffix):
    theirs = randomized(TimmViT(**timm_model_kwargs(SMALL)))
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": theirs.state_dict(), "epoch": 9}, path)
    else:
        save_file(theirs.state_dict(), str(path))
    ours = VisionTransformer(SMALL).eval()
    ours.load_state_dict(load_timm_checkpoint(path, SMALL))
    x = images(SMALL)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
    # the same file through load_pretrained, fine-tuned at another resolution and label set
    model = load_pretrained(path, config=SMALL, image_size=48, num_classes=2)
    assert model.cfg.image_size == 48 and model.head.out_features == 2


class _Payload:
    """An object whose unpickling runs code: here, writing a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    theirs = TimmViT(**timm_model_kwargs(SMALL))
    torch.save({"state_dict": theirs.state_dict(), "payload": _Payload(str(marker))}, path)
    with pytest.raises(UserError, match="weights_only=True"):
        load_timm_checkpoint(path, SMALL)
    with pytest.raises(UserError, match="weights_only=True"):
        load_pretrained(path, config=SMALL)
    assert not marker.exists(), "the pickled payload must never run"


def test_load_as_a_backbone_drops_the_head(tmp_path, caplog):
    save_pretrained(randomized(VisionTransformer(SMALL)), tmp_path)
    with caplog.at_level(logging.WARNING, logger="vit.models.weights"):
        backbone = load_pretrained(tmp_path, num_classes=0)
    assert "dropping it" in caplog.text
    assert backbone(images(SMALL)).shape == (3, SMALL.embed_dim)


def test_timm_hub_folder_loads_without_naming_the_architecture(tmp_path):
    """A timm model folder as the Hugging Face hub serves it: model.safetensors + timm's config.json."""
    cfg = config_from_timm("vit_tiny_patch16_224", num_classes=5)
    theirs = randomized(TimmViT(**timm_model_kwargs(cfg)))
    save_file(theirs.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "num_classes": 5, "global_pool": "token",
         "pretrained_cfg": {"mean": [0.5, 0.5, 0.5]}}))
    ours = load_pretrained(tmp_path).eval()
    assert ours.cfg == cfg
    x = images(cfg, n=2)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="neither a vitpipe model config"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# timm hub folders (timm's save_for_hf) and timm names: timm's meaning of every option


def _timm_hub(tmp_path, arch: str, **kwargs):
    """A real timm model (random weights, every parameter) saved as timm saves it for the hub."""
    from timm.models import save_for_hf

    theirs = randomized(timm.create_model(arch, pretrained=False, depth=2, **kwargs))  # depth: seconds, not tens
    folder = tmp_path / "hub"
    save_for_hf(theirs, str(folder), safe_serialization=True)
    return theirs, folder


@pytest.mark.parametrize("arch, kwargs, expect", [
    # global_pool='avg' alone: timm then puts a LayerNorm after pooling (fc_norm=True)
    ("vit_tiny_patch16_224", dict(global_pool="avg", img_size=32, patch_size=8, num_classes=5),
     dict(global_pool="avg", fc_norm=True, image_size=32, patch_size=8)),
    ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False, img_size=32, num_classes=2),
     dict(global_pool="avg", fc_norm=False)),
    ("vit_tiny_patch16_224", dict(in_chans=1, qkv_bias=False, img_size=48, num_classes=3),
     dict(in_chans=1, qkv_bias=False, image_size=48)),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", img_size=32, num_classes=2),
     dict(class_token=False, global_pool="avg", fc_norm=True)),
    ("deit_tiny_patch16_224", dict(num_classes=4, img_size=64), dict(embed_dim=192, num_heads=3, image_size=64)),
])
def test_timm_hub_folders_load_with_their_model_args(tmp_path, arch, kwargs, expect):
    theirs, folder = _timm_hub(tmp_path, arch, **kwargs)
    assert "model_args" in json.loads((folder / "config.json").read_text())
    ours = load_pretrained(folder).eval()
    for field, value in expect.items():
        assert getattr(ours.cfg, field) == value, field
    x = images(ours.cfg, n=2)
    with torch.no_grad():
        expected = theirs(x)
        assert expected.abs().max() > 0.1
        assert (ours(x) - expected).abs().max() < 1e-4


def test_timm_hub_label_names_and_preprocessing_are_read(tmp_path):
    from timm.models import save_for_hf

    from vit.models.weights import trained_preprocessing

    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    save_for_hf(theirs, str(tmp_path), safe_serialization=True,
                model_config={"label_names": ["cat", "dog", "eel"]},
                data_config={"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 0.875})
    assert load_pretrained(tmp_path).class_names == ["cat", "dog", "eel"]
    assert trained_preprocessing(tmp_path) == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                                               "eval_crop_pct": 0.875}


def test_config_from_a_timm_name_means_what_timm_create_model_means():
    """config_from_timm("name", **kwargs) is the architecture timm.create_model("name", **kwargs)
    builds: its weights load strictly, and give the same logits."""
    for kwargs in (dict(global_pool="avg"), dict(global_pool="avg", fc_norm=False), dict(qkv_bias=False),
                   dict(class_token=False, global_pool="avg"), dict(in_chans=1, img_size=64, patch_size=8)):
        theirs = randomized(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, **kwargs))
        cfg = config_from_timm("vit_tiny_patch16_224", depth=1, **kwargs)
        assert cfg.fc_norm == (kwargs.get("global_pool") == "avg" and kwargs.get("fc_norm", True)), kwargs
        ours = VisionTransformer(cfg).eval()
        ours.load_state_dict(timm_to_vitpipe(theirs.state_dict(), cfg))  # strict
        x = images(cfg, n=1)
        with torch.no_grad():
            assert (ours(x) - theirs(x)).abs().max() < 1e-4, kwargs
    deit = config_from_timm("deit_small_patch16_384")
    assert (deit.embed_dim, deit.num_heads, deit.image_size) == (384, 6, 384)


@pytest.mark.parametrize("name, why", [
    ("deit_tiny_distilled_patch16_224", "distillation token"),
    ("deit3_small_patch16_224", "DeiT III"),
    ("vit_base_patch16_clip_224", "plain ViT or DeiT name"),
    ("vit_base_patch16_gap_224", "plain ViT or DeiT name"),
    ("deit_large_patch16_224", "DeiT sizes are tiny, small and base"),
])
def test_timm_names_that_are_not_plain_vits_are_refused(name, why):
    with pytest.raises(UserError, match=why):
        config_from_timm(name)


def test_timm_options_without_an_equivalent_are_refused_in_one_line():
    for kwargs, named in ((dict(reg_tokens=4), "reg_tokens=4"), (dict(img_size=[32, 48]), "not square"),
                          (dict(global_pool="map"), "global_pool='map'"), (dict(init_values=1e-5), "init_values"),
                          (dict(act_layer="quick_gelu"), "act_layer"), (dict(wibble=1), "unknown option")):
        with pytest.raises(UserError, match=named) as e:
            config_from_timm("vit_tiny_patch16_224", **kwargs)
        assert "\n" not in str(e.value)


def test_a_bare_file_takes_channels_class_token_and_fc_norm_from_the_file(tmp_path):
    """A name ('micro/4') fixes the size of the network; the rest is read off the weights."""
    theirs = randomized(TimmViT(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                                in_chans=1, class_token=False, global_pool="avg", qkv_bias=False, num_classes=10))
    save_file(theirs.state_dict(), str(tmp_path / "bare.safetensors"))
    ours = load_pretrained(tmp_path / "bare.safetensors", config="micro/4").eval()
    assert (ours.cfg.in_chans, ours.cfg.class_token, ours.cfg.global_pool, ours.cfg.fc_norm,
            ours.cfg.qkv_bias) == (1, False, "avg", True, False)
    x = images(ours.cfg)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def test_a_file_at_another_resolution_than_the_preset_is_resampled_with_a_warning(tmp_path, caplog):
    theirs = TimmViT(img_size=48, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)
    save_file(theirs.state_dict(), str(tmp_path / "at48.safetensors"))
    with caplog.at_level(logging.INFO, logger="vit.models.weights"):
        model = load_pretrained(tmp_path / "at48.safetensors", config="micro/4")
    assert model.cfg.image_size == 32
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "12x12 patch grid (48 px at patch 4)" in warned[0].getMessage()
    assert "8x8 (32 px)" in warned[0].getMessage() and "image size 48" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vit.models.weights"):
        load_pretrained(tmp_path / "at48.safetensors", config="micro/4", image_size=48)
        load_pretrained(tmp_path / "at48.safetensors", config="micro/4", image_size=64)  # asked: said at INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_layouts_vitpipe_cannot_read_are_one_line_errors(tmp_path):
    no_cls = TimmViT(**timm_model_kwargs(dataclasses.replace(SMALL, class_token=False, global_pool="avg")))
    with pytest.raises(UserError, match="has no class token .* class_token=False and global_pool='avg'"):
        timm_to_vitpipe(no_cls.state_dict(), SMALL)
    deit3_like = TimmViT(**timm_model_kwargs(SMALL), no_embed_class=True)
    with pytest.raises(UserError, match="no_embed_class"):
        timm_to_vitpipe(deit3_like.state_dict(), SMALL)
    sd = TimmViT(**timm_model_kwargs(SMALL)).state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, :-2]
    with pytest.raises(UserError, match="14 patch positions after 1 class token.*not a square"):
        timm_to_vitpipe(sd, SMALL)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list"):
        load_pretrained(tmp_path)
