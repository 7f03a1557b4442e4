"""MAE and masked patch prediction as models and objectives, on the CPU: masks exact and
deterministic per seed, the encoder sees only the visible patches, the loss counts only what was
hidden, and the supervised forward is untouched."""

from __future__ import annotations

import pytest
import torch

from vit.models.mae import (MaskedAutoencoder, decoder_for, decoder_num_params, num_visible, patchify,
                            sincos_pos_embed, unpatchify)
from vit.models.mpp import MaskedPatchPredictor
from vit.models.vit import create_model
from vit.objectives import build_objective, micro_batch_seed
from vit.objectives.mae import MAEObjective, MAESection, masked_mse, patch_targets, reconstructions
from vit.objectives.mpp import MPPObjective, MPPSection, mean_colour_classes
from vit.train.config import PretrainConfig
from vitpipe.errors import UserError


def _mae(mask_ratio: float = 0.75, image_size: int = 16, seed: int = 0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    vit = create_model("micro/4", num_classes=0, image_size=image_size, in_chans=1)
    return MaskedAutoencoder(vit, decoder_for("micro/4"), mask_ratio=mask_ratio).eval()


def test_masks_are_exact_per_sample_and_a_function_of_the_seed():
    obj = MAEObjective(MAESection(mask_ratio=0.75), preset="micro/4")
    model = _mae()
    images = torch.randn(6, 1, 16, 16)
    masks = {}
    for seed in (1, 1, 2):
        _, mask = model(images, obj.noise(6, 16, torch.device("cpu"), seed))
        masks.setdefault(seed, []).append(mask)
    first = masks[1][0]
    assert torch.equal(first, masks[1][1])                       # same seed, same masks
    assert not torch.equal(first, masks[2][0])                   # another seed, others
    assert (first.sum(dim=1) == 12).all()                         # exactly 75% of 16 hidden, in every sample
    assert len({tuple(row.tolist()) for row in first}) == 6      # per sample, not one mask for the batch
    # The loop's seed depends on where the micro-batch is in the run only: a resumed run redraws them.
    assert micro_batch_seed(0, 1, 40) == micro_batch_seed(0, 1, 40) != micro_batch_seed(0, 1, 41)
    assert micro_batch_seed(0, 0, 40) != micro_batch_seed(0, 1, 40)


def test_the_encoder_sees_only_the_visible_patches():
    model = _mae()
    seen = []
    model.vit.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    images = torch.randn(3, 1, 16, 16)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        latent = model.vit.forward_tokens(model.vit.patch_embed(images), keep=noise.argsort(dim=1)[:, :4])
        _, mask = model(images, noise)
    assert seen[-1] == (3, 1 + num_visible(16, 0.75), 64) == (3, 5, 64)  # class token + 4 visible patches
    # Changing every hidden pixel leaves what the encoder computed unchanged; a visible pixel does not.
    hidden = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16), 4, 1).bool()
    with torch.no_grad():
        other = model.vit.forward_tokens(model.vit.patch_embed(torch.where(hidden, images + 5, images)),
                                         keep=noise.argsort(dim=1)[:, :4])
        moved = model.vit.forward_tokens(model.vit.patch_embed(torch.where(hidden, images, images + 5)),
                                         keep=noise.argsort(dim=1)[:, :4])
    assert torch.equal(other, latent)
    assert (moved - latent).abs().max() > 1e-3


def test_the_loss_counts_the_masked_patches_only():
    images = torch.randn(4, 1, 16, 16)
    target = patch_targets(images, 4, norm_pix=True)
    mask = torch.zeros(4, 16)
    mask[:, :12] = 1
    pred = target.clone()
    pred[:, 12:] += 10.0                      # wrong on the visible patches only
    assert masked_mse(pred, target, mask) == 0
    pred = target.clone().requires_grad_(True)
    loss = masked_mse(pred + 1.0, target, mask)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert (pred.grad[:, 12:] == 0).all() and (pred.grad[:, :12] != 0).all()
    # Normalised per patch: zero mean and unit variance in each patch that is not flat.
    assert target.mean(dim=-1).abs().max() < 1e-5 and (target.var(dim=-1) - 1).abs().max() < 1e-3


def test_objective_trains_the_autoencoder_and_reconstructs_visible_patches_exactly():
    cfg = PretrainConfig(data={"shards": "s", "image_size": 16, "channels": 1, "mean": [0.5], "std": [0.5]},
                         model={"preset": "micro/4"}, train={"objective": "mae"})
    obj = build_objective(cfg)
    model = obj.wrap(create_model("micro/4", num_classes=0, image_size=16, in_chans=1)).train()
    assert obj.export_prefix == "vit." and not obj.needs_labels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    losses = []
    for step in range(15):
        out = obj(model, images, torch.full((8,), -1), seed=7)  # one fixed mask: the loss must fall on it
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses
    original, masked, recon = reconstructions(images, out["pred"], out["mask"], patch_size=4, norm_pix=True,
                                              mean=(0.5,), std=(0.5,))
    visible = ~unpatchify(out["mask"].unsqueeze(-1).expand(-1, -1, 16), 4, 1).bool()
    assert torch.allclose(recon[visible], original[visible]) and torch.allclose(masked[visible], original[visible])
    assert original.min() >= 0 and original.max() <= 1


def test_supervised_forward_is_unchanged_by_the_token_path():
    torch.manual_seed(0)
    vit = create_model("micro/4", num_classes=10, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit.forward_tokens(vit.patch_embed(x)), vit.forward_features(x))


def test_patchify_sincos_and_decoder_presets():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)
    assert patchify(x, 4)[0, 1, :3].tolist() == x[0, :, 0, 4].tolist()  # (row, col, channel) inside a patch
    pe = sincos_pos_embed((4, 4), 64)
    assert pe.shape == (1, 17, 64) and (pe[0, 0] == 0).all() and pe[0, 1:].abs().max() <= 1
    assert decoder_for("b/16").embed_dim == 512 and decoder_for("B/16").depth == 8   # the paper's 512 x 8
    assert decoder_for("micro/4").embed_dim == 64 and decoder_for("micro/4", depth=1).depth == 1
    model = _mae()
    own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vit."))
    assert decoder_num_params(model.vit.cfg, model.decoder_cfg) == own
    # Parameter names of facebookresearch/mae: the encoder under vit., the decoder beside it.
    names = set(model.state_dict())
    assert {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_pred.weight"} <= names
    assert "vit.pos_embed" in names and "vit.blocks.0.attn.qkv.weight" in names


def test_mae_step_costs_a_fraction_of_a_supervised_one_in_flops():
    model = _mae(image_size=32)
    full = model.vit.flops_per_image(training=True)
    encoder = model.vit.flops_per_image(training=True, encoded_patches=16)  # 16 of the 64 patches
    assert encoder < 0.3 * full and encoder < model.flops_per_image(training=True) < full


def test_mpp_corrupts_half_the_patches_with_the_papers_shares():
    obj = MPPObjective(MPPSection(), mean=(0.5,), std=(0.5,), channels=1)
    corrupted, source, masked = obj.corruption(400, 16, torch.device("cpu"), seed=3)
    again = obj.corruption(400, 16, torch.device("cpu"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip((corrupted, source, masked), again))
    assert (corrupted.sum(dim=1) == 8).all()                      # exactly 50% of each sample
    own = torch.arange(400 * 16).view(400, 16)
    swapped = source != own
    assert not (masked & ~corrupted).any() and not (swapped & ~corrupted).any()
    n = corrupted.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.03)
    assert swapped.sum().item() / n == pytest.approx(0.1, abs=0.02)   # the rest (~10%) kept as is


def test_mpp_targets_are_3_bit_mean_colours_and_loss_counts_corrupted_patches_only():
    # An RGB image whose top-left patch is pure red (1, 0, 0) and the rest mid-grey.
    pixels = torch.full((1, 3, 8, 8), 0.5)
    pixels[0, :, :4, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    images = (pixels - 0.5) / 0.5
    classes = mean_colour_classes(images, 4, 3, (0.5,) * 3, (0.5,) * 3)
    assert classes[0, 0].item() == 7          # red level 7, green and blue 0
    assert classes[0, 1].item() == 4 + 4 * 8 + 4 * 64
    torch.manual_seed(0)
    vit = create_model("micro/4", num_classes=0, image_size=16, in_chans=1)
    obj = MPPObjective(MPPSection(), mean=(0.5,), std=(0.5,), channels=1)
    model = obj.wrap(vit)
    assert isinstance(model, MaskedPatchPredictor) and model.mpp_head.out_features == 8  # 3 bits of grey
    logits = []

    def keep(module, args, out):
        out.retain_grad()
        logits.append(out)

    model.mpp_head.register_forward_hook(keep)
    out = obj(model, torch.randn(4, 1, 16, 16), torch.full((4,), -1), seed=5)
    out["loss"].backward()
    corrupted, _, _ = obj.corruption(4, 16, torch.device("cpu"), seed=5)
    grad = logits[0].grad.abs().sum(dim=-1)
    assert (grad[~corrupted] == 0).all() and (grad[corrupted] > 0).all()


@pytest.mark.parametrize("overrides, message", [
    ({"train.objective": "mae", "mae.mask_ratio": 1.5}, r"mae.mask_ratio=1.5 must be in \(0, 1\)"),
    ({"train.objective": "mae", "mae.mask_ratio": 0}, r"mae.mask_ratio=0(\.0)? must be in \(0, 1\)"),
    ({"mae.mask_ratio": 0.5}, "mae.mask_ratio is an option of --train.objective mae, but this run's objective "
                              "is supervised"),
    ({"train.objective": "mae", "mpp.bits": 2}, "mpp.bits is an option of --train.objective mpp"),
    ({"probe.shards": "x"}, "probe.shards is an option of --train.objective mae/mpp"),
    ({"train.objective": "mpp", "data.augment.mixup_alpha": 0.8}, "mixup_alpha=0.8 mixes labels"),
    ({"train.objective": "mpp", "mpp.replace_mask": 0.95}, "exceed 1"),
])
def test_bad_objective_options_name_the_value_and_the_fix(overrides, message):
    from vitpipe.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config(PretrainConfig, None, {"data.shards": "s", **overrides})


def test_a_resolved_config_written_back_loads_again(tmp_path):
    """config.yaml holds every section with its defaults: a supervised one must not trip the MAE check."""
    from vitpipe.config import build_config, save_config

    for objective in ("supervised", "mae"):
        cfg = build_config(PretrainConfig, None, {"data.shards": "s", "train.objective": objective})
        again = build_config(PretrainConfig, save_config(cfg, tmp_path / f"{objective}.yaml"))
        assert again == cfg


def test_decoder_that_cannot_fit_or_be_built_is_refused_before_building():
    vit_cfg = create_model("micro/4", num_classes=0, image_size=16).cfg
    huge = MAEObjective(MAESection(decoder_dim=65536, decoder_depth=8, decoder_heads=64), preset="micro/4")
    with pytest.raises(UserError, match=r"mae.decoder_dim=65536 x mae.decoder_depth=8: the decoder alone needs "
                                        r"~\d+ GiB.*--mae.decoder-dim 512"):
        huge.check(vit_cfg, batch_size=64, memory_bytes=64 * 2**30)
    odd = MAEObjective(MAESection(decoder_dim=100, decoder_heads=3), preset="micro/4")
    with pytest.raises(UserError, match="decoder_dim=100 must be divisible by mae.decoder_heads=3"):
        odd.check(vit_cfg, batch_size=64, memory_bytes=None)
    tiny_grid = create_model("micro/4", num_classes=0, image_size=8).cfg  # 4 patches: 0.9 hides them all
    with pytest.raises(UserError, match="mae.mask_ratio=0.9 leaves 0 of the 4 patches"):
        MAEObjective(MAESection(mask_ratio=0.9), preset="micro/4").check(tiny_grid, batch_size=8, memory_bytes=None)
