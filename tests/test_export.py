"""`vitpipe export --format timm-hub`: a folder real timm loads with the same logits, both ways it is loaded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vit.models.vit import VisionTransformer, preset_config
from vit.models.weights import load_pretrained, save_pretrained
from vitpipe.cli import main as vitpipe

timm = pytest.importorskip("timm")


def _trained(**overrides) -> VisionTransformer:
    """A vitpipe model with every weight random (heads and norms too), as training leaves it."""
    model = VisionTransformer(preset_config("micro/4", **overrides))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0))
    return model.eval()


def _images(cfg, n: int = 4) -> torch.Tensor:
    return torch.randn(n, cfg.in_chans, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [
    dict(in_chans=1, num_classes=10),
    # vitpipe models that differ from timm's defaults for their options: mean pooling with the norm
    # before pooling, no class token, no qkv biases
    dict(global_pool="avg", fc_norm=False, num_classes=3),
    dict(class_token=False, global_pool="avg", qkv_bias=False, num_classes=2),
])
def test_export_loads_in_timm_with_identical_logits(tmp_path, capsys, overrides):
    model = _trained(**overrides)
    model.class_names = [f"c{i}" for i in range(model.cfg.num_classes)]
    export = save_pretrained(model, tmp_path / "run" / "export")
    chans = model.cfg.in_chans
    (export / "train_config.yaml").write_text(yaml.safe_dump(
        {"data": {"mean": [0.2] * chans, "std": [0.3] * chans, "eval_crop_pct": 0.875}}))
    out = tmp_path / "timm-hub"
    assert vitpipe(["export", str(export), str(out), "--format", "timm-hub"]) == 0
    said = capsys.readouterr().out
    assert "gives the same logits" in said and f"local-dir:{out}" in said
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    x = _images(model.cfg)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1

        # 1. the hub-style local folder: everything from config.json
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.equal(local(x), expected)
        data = timm.data.resolve_data_config(model=local)
        assert tuple(data["mean"]) == (0.2,) * chans and tuple(data["std"]) == (0.3,) * chans
        assert data["crop_pct"] == 0.875
        assert local.pretrained_cfg["label_names"] == model.class_names

        # 2. an architecture name + the weights file, with the model_args the folder records
        n = config["num_classes"]
        args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
        by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=n, **args,
                                    pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=n))
        assert torch.equal(by_file.eval()(x), expected)

    back = load_pretrained(out)  # and vitpipe reads the folder back as the same model
    assert back.cfg == model.cfg and back.class_names == model.class_names


def test_a_timm_create_model_with_global_pool_avg_loads_vitpipe_weights_strictly(tmp_path):
    """global_pool='avg' means the same in both: timm's fc_norm default (True) is vitpipe's."""
    model = _trained(global_pool="avg", num_classes=10)
    save_pretrained(model, tmp_path)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", img_size=32,
                               patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)
    theirs.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict
    x = _images(model.cfg)
    with torch.no_grad():
        assert (theirs.eval()(x) - model(x)).abs().max() < 1e-5


def test_export_refusals_are_one_line(tmp_path, capsys):
    export = save_pretrained(_trained(representation_size=16), tmp_path / "export")
    assert vitpipe(["export", str(export), str(tmp_path / "a")]) == 2
    assert "representation_size=16" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert vitpipe(["export", str(save_pretrained(_trained(), tmp_path / "e2")), str(tmp_path / "busy")]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert vitpipe(["export", str(tmp_path / "missing"), str(tmp_path / "b")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_recorded_architecture_names_are_registered_in_timm():
    from vit.models.weights import _TIMM_REGISTERED, timm_architecture

    assert _TIMM_REGISTERED <= set(timm.list_models())
    assert timm_architecture(preset_config("s/16", image_size=384)) == "vit_small_patch16_384"
    assert timm_architecture(preset_config("h/14", image_size=448)) == "vit_huge_patch14_224"
    assert timm_architecture(preset_config("micro/4")) == "vit_base_patch16_224"


def _hub(folder, **model_args):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 2,
                                                    "model_args": model_args, "pretrained_cfg": {}}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_weight_loading_refusals_through_the_cli_are_one_line(tmp_path, capsys):
    """What a user meets at the command line for files vitpipe cannot load: exit 2 and one line
    naming what the file has and what to do, never a traceback."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    small = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)
    cases = []
    save_file(TimmViT(**small, no_embed_class=True).state_dict(), str(tmp_path / "deit3_like.safetensors"))
    cases.append((["--model-preset", "micro/4"], tmp_path / "deit3_like.safetensors", "no_embed_class"))
    save_file(TimmViT(**small, reg_tokens=4).state_dict(), str(tmp_path / "reg.safetensors"))
    cases.append((["--model-preset", "micro/4"], tmp_path / "reg.safetensors", "register tokens"))
    save_file(TimmViT(**small).state_dict(), str(tmp_path / "bare.safetensors"))
    cases.append(([], tmp_path / "bare.safetensors", "--model-preset"))
    cases.append((["--model-preset", "vit_base_patch16_siglip_224"], tmp_path / "bare.safetensors", "plain ViT"))
    (tmp_path / "text.safetensors").write_text("hello")
    cases.append((["--model-preset", "s/16"], tmp_path / "text.safetensors", "not a readable safetensors file"))
    cases.append(([], _hub(tmp_path / "hub_qk", qk_norm=True), "qk_norm=True"))
    cases.append(([], _hub(tmp_path / "hub_rect", img_size=[32, 48]), "not square"))
    for i, (extra, path, named) in enumerate(cases):
        assert vitpipe(["export", str(path), str(tmp_path / f"out{i}"), *extra]) == 2, path
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
