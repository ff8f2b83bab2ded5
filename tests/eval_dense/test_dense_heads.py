"""Linear heads, frozen-backbone models and the loaders for released (mmseg-layout) head checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinolab.eval import heads
from dinolab.hub.convert import CheckpointMismatchError


def test_center_pad_splits_padding_evenly() -> None:
    images = torch.randn(2, 3, 30, 45)
    padded, (top, left) = heads.center_pad(images, 14)
    assert padded.shape == (2, 3, 42, 56)
    assert (top, left) == (6, 5)  # 12 rows -> 6 above; 11 columns -> 5 left, 6 right
    torch.testing.assert_close(padded[:, :, top : top + 30, left : left + 45], images)
    assert padded.abs().sum() == images.abs().sum()


def test_dense_features_concatenate_blocks_and_cls(tiny_backbone) -> None:
    images = torch.randn(2, 3, 28, 42)
    out = heads.dense_features(tiny_backbone, images, [0, 1], norm=False, with_cls=True)
    assert out.shape == (2, 4 * 192, 2, 3)
    layers = tiny_backbone.get_intermediate_layers(images, n=[0, 1], reshape=True, return_class_token=True, norm=False)
    for i, (patches, cls) in enumerate(layers):
        torch.testing.assert_close(out[:, 2 * i * 192 : (2 * i + 1) * 192], patches)
        torch.testing.assert_close(out[:, (2 * i + 1) * 192 : (2 * i + 2) * 192, 1, 2], cls)


def test_bins_and_normalisations() -> None:
    torch.testing.assert_close(heads.depth_bins(1.0, 4.0, 4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(heads.depth_bins(0.1, 10.0, 3, "log"), torch.tensor([0.1, 1.0, 10.0]))
    logits = torch.tensor([-1.0, 0.0, 2.0]).view(1, 3, 1, 1)
    expected = torch.tensor([0.1, 0.1, 2.1]) / 2.3  # relu + 0.1, normalised
    torch.testing.assert_close(heads.bin_weights(logits, "linear").flatten(), expected)
    torch.testing.assert_close(heads.bin_weights(logits, "softmax").flatten(), logits.flatten().softmax(0))
    sig = torch.sigmoid(logits.flatten())
    torch.testing.assert_close(heads.bin_weights(logits, "sigmoid").flatten(), sig / sig.sum())
    with pytest.raises(ValueError, match="normalization"):
        heads.bin_weights(logits, "max")


def test_depth_head_is_the_expectation_over_bins() -> None:
    torch.manual_seed(0)
    head = heads.LinearDepthHead(6, n_bins=5, min_depth=0.5, max_depth=4.5, upsample=2)
    features = torch.randn(1, 6, 2, 3)
    out = head(features)
    assert out.shape == (1, 1, 4, 6)
    up = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
    bins = [0.5, 1.5, 2.5, 3.5, 4.5]
    for y in range(4):
        for x in range(6):
            logits = head.conv_depth.weight[:, :, 0, 0] @ up[0, :, y, x] + head.conv_depth.bias
            weights = torch.relu(logits) + 0.1
            expected = sum(w * b for w, b in zip(weights / weights.sum(), bins))
            torch.testing.assert_close(out[0, 0, y, x], expected)


def _fabricated_seg_checkpoint(channels: int = 192, classes: int = 150) -> dict:
    g = torch.Generator().manual_seed(1)
    state = {
        "decode_head.conv_seg.weight": torch.randn(classes, channels, 1, 1, generator=g),
        "decode_head.conv_seg.bias": torch.randn(classes, generator=g),
        "decode_head.bn.weight": torch.rand(channels, generator=g) + 0.5,
        "decode_head.bn.bias": torch.randn(channels, generator=g),
        "decode_head.bn.running_mean": torch.randn(channels, generator=g),
        "decode_head.bn.running_var": torch.rand(channels, generator=g) + 0.5,
        "decode_head.bn.num_batches_tracked": torch.tensor(40000),
    }
    meta = {"mmseg_version": "0.27.0", "CLASSES": ("wall", "building"), "PALETTE": [[120, 120, 120]]}
    return {"meta": meta, "state_dict": state}


def test_released_segmentation_head_loads_and_computes_bn_then_conv(tmp_path) -> None:
    checkpoint = _fabricated_seg_checkpoint()
    torch.save(checkpoint, tmp_path / "dinov2_vits14_ade20k_linear_head.pth")
    head = heads.seg_head_from_checkpoint(tmp_path / "dinov2_vits14_ade20k_linear_head.pth").eval()
    state = checkpoint["state_dict"]
    features = torch.randn(2, 192, 3, 4)
    normed = (features - state["decode_head.bn.running_mean"].view(1, -1, 1, 1)) / torch.sqrt(
        state["decode_head.bn.running_var"].view(1, -1, 1, 1) + 1e-5
    ) * state["decode_head.bn.weight"].view(1, -1, 1, 1) + state["decode_head.bn.bias"].view(1, -1, 1, 1)
    expected = torch.einsum("kc,bchw->bkhw", state["decode_head.conv_seg.weight"][:, :, 0, 0], normed)
    expected = expected + state["decode_head.conv_seg.bias"].view(1, -1, 1, 1)
    torch.testing.assert_close(head(features), expected, rtol=1e-4, atol=1e-4)


def test_released_head_loading_is_strict(tmp_path) -> None:
    state = _fabricated_seg_checkpoint()["state_dict"]
    missing = {k: v for k, v in state.items() if k != "decode_head.bn.running_var"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: bn\.running_var"):
        heads.seg_head_from_checkpoint(missing)
    extra = {**state, "decode_head.conv_seg2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: conv_seg2\.weight"):
        heads.seg_head_from_checkpoint(extra)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        heads.load_released_head(heads.LinearSegHead(384, 150), state)
    with pytest.raises(CheckpointMismatchError, match="neither decode_head"):
        heads.seg_head_from_checkpoint({**state, "auxiliary_head.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="not a linear"):
        heads.seg_head_from_checkpoint({"decode_head.conv_depth.weight": torch.zeros(256, 4, 1, 1)})
    no_counter = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert heads.seg_head_from_checkpoint(no_counter).conv_seg.out_channels == 150  # older mmcv files


def test_released_depth_head_loads(tmp_path) -> None:
    g = torch.Generator().manual_seed(2)
    state = {
        "decode_head.conv_depth.weight": torch.randn(256, 2 * 192, 1, 1, generator=g),
        "decode_head.conv_depth.bias": torch.randn(256, generator=g),
        "backbone.pos_embed": torch.zeros(1, 5, 192),  # full-model files also hold the backbone: ignored
    }
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "dinov2_vits14_nyu_linear_head.pth")
    head = heads.depth_head_from_checkpoint(tmp_path / "dinov2_vits14_nyu_linear_head.pth", max_depth=10.0)
    assert head.conv_depth.in_channels == 384 and head.bins.shape == (256,)
    torch.testing.assert_close(head.conv_depth.weight, state["decode_head.conv_depth.weight"])
    torch.testing.assert_close(head.conv_depth.bias, state["decode_head.conv_depth.bias"])


def test_saved_head_round_trips_in_the_released_layout(tmp_path) -> None:
    head = heads.LinearSegHead(8, 3)
    torch.nn.init.normal_(head.bn.running_mean)
    torch.save(heads.head_checkpoint(head, {"config": "{}"}), tmp_path / "head.pth")
    loaded = heads.seg_head_from_checkpoint(tmp_path / "head.pth")
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_segmenter_freezes_backbone_and_outputs_input_size(tiny_backbone) -> None:
    model = heads.Segmenter(tiny_backbone, num_classes=5, blocks=2).train()
    assert not tiny_backbone.training and model.head.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    logits = model(torch.randn(2, 3, 30, 45))
    assert logits.shape == (2, 5, 30, 45)
    logits.sum().backward()
    assert model.head.conv_seg.weight.grad is not None


def test_depther_output_and_official_block_choice(tiny_backbone) -> None:
    head = heads.make_depth_head(tiny_backbone, blocks=1, n_bins=8, min_depth=0.5, max_depth=3.0)
    depth = heads.Depther(tiny_backbone, head, blocks=1)(torch.randn(1, 3, 33, 50)).detach()
    assert depth.shape == (1, 1, 33, 50)
    assert float(depth.min()) >= 0.5 and float(depth.max()) <= 3.0  # an expectation of the bins stays in range
    assert heads.official_depth_blocks(12) == [2, 5, 8, 11] and heads.official_depth_blocks(24) == [4, 11, 17, 23]
    assert heads.official_depth_blocks(2) == [0, 1] and heads.official_depth_blocks(8) == [1, 3, 5, 7]
