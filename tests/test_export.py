"""python -m common.export and finetune.py --init with weights of other frameworks.

The expected names are never taken from common.formats: torchvision's and timm's come from their own models,
detectron2's and MMDetection's are built below from each framework's naming rules, the source of each rule
beside it (detectron2 at facebookresearch/detectron2, modeling/...; MMDetection 3.x at open-mmlab/mmdetection,
mmdet/models/...; MoCo's detection/convert-pretrain-to-detectron2.py for the backbone alone). detectron2 is not
on the package registry; MMDetection 3.3 installs from it but builds its detectors only with mmcv's compiled
ops, which need a long compile on a CPU machine: both are checked against the rules here (the fixture
approach), and test_*_loads_them_for_real run where the framework imports (loading the files into its own
models with its own checkpoint loader). Every weight is drawn at random first, so that a mapping which swaps
two tensors of one shape changes an output.
"""
import importlib.util
import os
import pickle
import re

import numpy as np
import pytest
import timm
import torch
import torchvision
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from common import checkpoint, cli, export, formats
from common.detectors import build_detector, part_of
from conftest import SMALL, TINY, run_script

K = 3  # foreground classes of the models built here
FORMAT_EXT = {"torchvision": "pth", "timm": "pth", "detectron2": "pkl", "mmdet": "pth"}


def randomised(model, seed=0, head_std=0.1):
    """``model`` in eval mode with every float tensor of its state drawn at random: N(0, 0.1^2), BN variances in
    [0.5, 1.5), the parts after the ResNet N(0, head_std^2) (at 0.1 an R-CNN's deltas move every box off the image)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                std = 0.1 if key.startswith("backbone.body.") else head_std
                drawn = torch.rand(value.shape, generator=g) + 0.5 if key.endswith("running_var") else \
                    torch.randn(value.shape, generator=g) * std
                value.copy_(drawn)
    return model.eval()


def export_file(tmp_path, state, meta, fmt, backbone_only=False, name="model_final.pth"):
    """``state`` + ``meta`` saved as a model_final.pth, exported with the command's main: the file written."""
    src = str(tmp_path / name)
    checkpoint.save({"kind": "final", "model": state, "meta": meta}, src)
    out = str(tmp_path / f"{name}.{fmt}.{FORMAT_EXT[fmt]}")
    cli.run(export.main, export.get_args_parser(), [src, "--to", fmt, "--out", out] + ["--backbone-only"] * backbone_only)
    return out


def read_as_framework(fmt, path):
    """The file as the framework reads it: {name: tensor} (detectron2: pickle of numpy arrays, its layout checked)."""
    if fmt == "detectron2":
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")  # detectron2's DetectionCheckpointer._load_file
        assert data["matching_heuristics"] is True and data["__author__"]
        assert all(isinstance(v, np.ndarray) for v in data["model"].values())
        return {k: torch.from_numpy(v) for k, v in data["model"].items()}
    obj = torch.load(path, weights_only=True)
    if fmt == "mmdet":  # mmengine's load_checkpoint takes 'state_dict' out of the file
        assert set(obj) == {"state_dict", "meta"}
        return obj["state_dict"]
    return obj


# ---- detectron2's names, from its rules ----
def detectron2_names(depth, box_head, masks, k=K):
    """{name: shape} of detectron2's GeneralizedRCNN on R-<depth>-FPN (FrozenBN, as its configs use)."""
    shapes = {}

    def conv(name, c_out, c_in, size, norm=False):
        # layers/wrappers.py Conv2d: a norm is the conv's child 'norm'; a conv with a norm has no bias
        shapes[f"{name}.weight"] = (c_out, c_in, size, size)
        for p in ("weight", "bias", "running_mean", "running_var") if norm else ("bias",):
            shapes[f"{name}.norm.{p}" if norm else f"{name}.{p}"] = (c_out,)

    basic = depth in (18, 34)  # backbone/resnet.py build_resnet_backbone: BasicBlock for R18 / R34
    conv("backbone.bottom_up.stem.conv1", 64, 3, 7, norm=True)  # resnet.py BasicStem: 'conv1', 7x7
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]  # num_blocks_per_stage
    c_in, c_out, mid = 64, 64 if basic else 256, 64  # RES2_OUT_CHANNELS (64 for R18/R34), bottleneck width 64
    for stage, n in zip((2, 3, 4, 5), blocks):  # ResNet.__init__: stage i is named "res" + str(i + 2)
        for b in range(n):
            block = f"backbone.bottom_up.res{stage}.{b}"  # make_stage: an nn.Sequential of blocks
            if c_in != c_out:  # BasicBlock / BottleneckBlock: a 'shortcut' 1x1 conv where in != out channels
                conv(f"{block}.shortcut", c_out, c_in, 1, norm=True)
            if basic:  # BasicBlock: conv1, conv2 (3x3)
                conv(f"{block}.conv1", c_out, c_in, 3, norm=True)
                conv(f"{block}.conv2", c_out, c_out, 3, norm=True)
            else:  # BottleneckBlock: conv1 1x1, conv2 3x3, conv3 1x1
                conv(f"{block}.conv1", mid, c_in, 1, norm=True)
                conv(f"{block}.conv2", mid, mid, 3, norm=True)
                conv(f"{block}.conv3", c_out, mid, 1, norm=True)
            c_in = c_out
        c_out, mid = c_out * 2, mid * 2
    for stage in (2, 3, 4, 5):  # fpn.py: 'fpn_lateral{s}', 'fpn_output{s}', s = log2(stride of res{s}); no norm
        conv(f"backbone.fpn_lateral{stage}", 256, (64 if basic else 256) * 2 ** (stage - 2), 1)
        conv(f"backbone.fpn_output{stage}", 256, 256, 3)
    rpn = "proposal_generator.rpn_head"  # meta_arch/rcnn.py 'proposal_generator'; rpn.py RPN 'rpn_head'
    conv(f"{rpn}.conv", 256, 256, 3)  # StandardRPNHead: 'conv', 'objectness_logits' (A), 'anchor_deltas' (A x 4)
    conv(f"{rpn}.objectness_logits", 3, 256, 1)  # A = 3 aspect ratios, one size per level
    conv(f"{rpn}.anchor_deltas", 12, 256, 1)

    def fc(name, c_out, c_in):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in), (c_out,)

    if box_head == "4conv1fc":  # box_head.py FastRCNNConvFCHead: 'conv1'..'conv4' (no norm: bias), then 'fc1'
        for i in (1, 2, 3, 4):
            conv(f"roi_heads.box_head.conv{i}", 256, 256, 3)
        fc("roi_heads.box_head.fc1", 1024, 256 * 7 * 7)
    else:  # NUM_FC 2: 'fc1', 'fc2'
        fc("roi_heads.box_head.fc1", 1024, 256 * 7 * 7)
        fc("roi_heads.box_head.fc2", 1024, 1024)
    fc("roi_heads.box_predictor.cls_score", k + 1, 1024)  # fast_rcnn.py: K + 1 scores, the background last
    fc("roi_heads.box_predictor.bbox_pred", 4 * k, 1024)  # class-specific deltas for the K classes only
    if masks:  # mask_head.py MaskRCNNConvUpsampleHead: 'mask_fcn1'..'4', 'deconv' (2x2), 'predictor' (K)
        for i in (1, 2, 3, 4):
            conv(f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3)
        shapes["roi_heads.mask_head.deconv.weight"], shapes["roi_heads.mask_head.deconv.bias"] = (256, 256, 2, 2), (256,)
        conv("roi_heads.mask_head.predictor", k, 256, 1)
    return shapes


def moco_name(name):
    """MoCo's converter's renaming of a torchvision ResNet name (convert-pretrain-to-detectron2.py): a name outside
    the stages gets 'stem.', layer{t} -> res{t+1}, bn{t} -> conv{t}.norm, downsample.0 / .1 -> shortcut / .norm."""
    name = name if "layer" in name else "stem." + name
    name = re.sub(r"layer(\d)", lambda m: f"res{int(m[1]) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


# ---- MMDetection's names, from its rules ----
def mmdet_names(depth, box_head, masks, k=K):
    """{name: shape} of MMDetection 3.x's Faster / Mask R-CNN on R-<depth>-FPN (its BN keeps a step counter)."""
    resnet = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    # models/backbones/resnet.py: the stem's 'conv1' + 'bn1' (build_norm_layer, postfix 1), res layers
    # 'layer{i + 1}', blocks 'conv{j}' + 'bn{j}', 'downsample' = Sequential(conv, norm): torchvision's names
    shapes = {f"backbone.{n}": tuple(v.shape) for n, v in resnet.items() if not n.startswith("fc.")}

    def conv(name, c_out, c_in, size):  # mmcv ConvModule without norm: its 'conv', with a bias
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, size, size), (c_out,)

    channels = (64, 128, 256, 512) if depth in (18, 34) else (256, 512, 1024, 2048)
    for i, c in enumerate(channels):  # necks/fpn.py: 'lateral_convs' / 'fpn_convs' ModuleLists of ConvModule
        conv(f"neck.lateral_convs.{i}.conv", 256, c, 1)
        conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3)  # num_outs 5 without extra convs: P6 is a max pool
    conv("rpn_head.rpn_conv", 256, 256, 3)  # dense_heads/rpn_head.py: 'rpn_conv', 'rpn_cls' (A x 1: sigmoid)
    conv("rpn_head.rpn_cls", 3, 256, 1)
    conv("rpn_head.rpn_reg", 12, 256, 1)  # 'rpn_reg' (A x 4)
    head = "roi_head.bbox_head"  # roi_heads/bbox_heads/convfc_bbox_head.py: 'shared_convs' (ConvModule), 'shared_fcs'
    for i in range(4 if box_head == "4conv1fc" else 0):
        conv(f"{head}.shared_convs.{i}.conv", 256, 256, 3)
    fcs = [(1024, 256 * 7 * 7)] + [(1024, 1024)] * (box_head == "2fc")
    shapes.update({f"{head}.shared_fcs.{i}.{p}": (o, c) if p == "weight" else (o,)
                   for i, (o, c) in enumerate(fcs) for p in ("weight", "bias")})
    # bbox_head.py: 'fc_cls' K + 1 (the background last: label K), 'fc_reg' 4 x K (class-specific)
    shapes.update({f"{head}.fc_cls.weight": (k + 1, 1024), f"{head}.fc_cls.bias": (k + 1,),
                   f"{head}.fc_reg.weight": (4 * k, 1024), f"{head}.fc_reg.bias": (4 * k,)})
    if masks:  # roi_heads/mask_heads/fcn_mask_head.py: 'convs' (4 ConvModule), 'upsample' (deconv 2x2), 'conv_logits' (K)
        for i in range(4):
            conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3)
        shapes["roi_head.mask_head.upsample.weight"], shapes["roi_head.mask_head.upsample.bias"] = (256, 256, 2, 2), (256,)
        conv("roi_head.mask_head.conv_logits", k, 256, 1)
    return shapes


RCNNS = [(18, "4conv1fc", "maskrcnn"), (50, "2fc", "fasterrcnn")]


@pytest.mark.parametrize("depth, box_head, detector", RCNNS)
def test_detectron2_export_has_detectron2s_names_shapes_and_class_order(tmp_path, depth, box_head, detector):
    model = randomised(build_detector(detector, K, f"resnet{depth}", norm="bn", box_head=box_head))
    state, meta = model.state_dict(), {"num_classes": K, "backbone": f"resnet{depth}", "detector": detector}
    exported = read_as_framework("detectron2", export_file(tmp_path, state, meta, "detectron2"))
    expected = detectron2_names(depth, box_head, masks=detector == "maskrcnn")
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected
    # the class layers: detectron2's score K is the background, torchvision's 0; detectron2 has no background rows
    ours, theirs = state["roi_heads.box_predictor.cls_score.weight"], exported["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(theirs[K], ours[0]) and torch.equal(theirs[:K], ours[1:])
    assert torch.equal(exported["roi_heads.box_predictor.bbox_pred.bias"], state["roi_heads.box_predictor.bbox_pred.bias"][4:])
    if detector == "maskrcnn":
        assert torch.equal(exported["roi_heads.mask_head.predictor.weight"],
                           state["roi_heads.mask_predictor.mask_fcn_logits.weight"][1:])
    assert torch.equal(exported["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
                       state["backbone.body.layer2.0.downsample.1.running_var"])
    # the backbone alone: MoCo's layout, which detectron2 matches to any ResNet model by suffix
    alone = read_as_framework("detectron2", export_file(tmp_path, state, meta, "detectron2", backbone_only=True))
    resnet = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    assert set(alone) == {moco_name(k) for k in resnet if not k.startswith("fc.") and "num_batches" not in k}
    assert set(alone) == {k[len("backbone.bottom_up."):] for k in expected if k.startswith("backbone.bottom_up.")}


@pytest.mark.parametrize("depth, box_head, detector", RCNNS)
def test_mmdet_export_has_mmdetections_names_shapes_and_class_order(tmp_path, depth, box_head, detector):
    model = randomised(build_detector(detector, K, f"resnet{depth}", norm="bn", box_head=box_head))
    state, meta = model.state_dict(), {"num_classes": K, "backbone": f"resnet{depth}", "detector": detector}
    exported = read_as_framework("mmdet", export_file(tmp_path, state, meta, "mmdet"))
    assert {k: tuple(v.shape) for k, v in exported.items()} == mmdet_names(depth, box_head, detector == "maskrcnn")
    ours, theirs = state["roi_heads.box_predictor.cls_score.bias"], exported["roi_head.bbox_head.fc_cls.bias"]
    assert torch.equal(theirs, torch.cat([ours[1:], ours[:1]]))  # background last
    assert torch.equal(exported["roi_head.bbox_head.fc_reg.weight"], state["roi_heads.box_predictor.bbox_pred.weight"][4:])
    # the backbone alone, for init_cfg=dict(type="Pretrained", checkpoint=FILE): the ResNet's own names
    alone = read_as_framework("mmdet", export_file(tmp_path, state, meta, "mmdet", backbone_only=True))
    assert {f"backbone.{k}": tuple(v.shape) for k, v in alone.items()} == \
        {k: v for k, v in mmdet_names(depth, box_head, False).items() if k.startswith("backbone.")}


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_export_gives_torchvisions_and_timms_resnet_features(tmp_path, depth):
    ours = randomised(build_detector("fasterrcnn", K, f"resnet{depth}"))  # frozen BN, as a fine-tune loads it
    out = export_file(tmp_path, ours.state_dict(), {"num_classes": K}, "timm")
    resnet = getattr(torchvision.models, f"resnet{depth}")()
    loaded = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert loaded.missing_keys == ["fc.weight", "fc.bias"] and loaded.unexpected_keys == []
    resnet.eval()
    # timm's own way to start from a local file (no download): the classifier left out with num_classes=0
    net = timm.create_model(f"resnet{depth}", pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": out}).eval()
    x = torch.randn(1, 3, 75, 133, generator=torch.Generator().manual_seed(1))  # odd, non-square: no transposition passes
    with torch.no_grad():
        expected = ours.backbone.body(x)  # {"0": C2, ..., "3": C5}
        y = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for i, layer in enumerate((resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)):
            y = layer(y)
            # float32: FrozenBatchNorm2d folds the statistics into a scale and a shift where BatchNorm2d normalises
            # first: the same function, rounded differently (measured: 2e-7 of the range here, 2e-6 on a COCO image);
            # 1e-5 of the features' range bounds that over 50 layers, a wrong mapping changes them by O(1)
            torch.testing.assert_close(y, expected[str(i)], rtol=0, atol=1e-5 * float(expected[str(i)].abs().max()))
        torch.testing.assert_close(net.forward_features(x), expected["3"], rtol=0,
                                   atol=1e-5 * float(expected["3"].abs().max()))


def torchvision_detector(name, backbone, box_head, k=K, norm_layer=FrozenBatchNorm2d, **kwargs):
    """The matching detector built from torchvision's own classes (frozen BN, as a fine-tune loads it)."""
    if name in ("retinanet", "fcos"):
        body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm_layer,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return (RetinaNet if name == "retinanet" else FCOS)(body, k + 1, **kwargs)
    head = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=None) if box_head == "4conv1fc" else None
    cls = MaskRCNN if name == "maskrcnn" else FasterRCNN
    return cls(resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm_layer), k + 1, box_head=head,
               **kwargs)


@pytest.mark.parametrize("name, box_head", [("fasterrcnn", "2fc"), ("maskrcnn", "4conv1fc"), ("retinanet", None),
                                            ("fcos", None)])
def test_detector_export_gives_the_torchvision_detectors_outputs(tmp_path, name, box_head):
    image = torch.rand(3, 150, 230, generator=torch.Generator().manual_seed(2))  # non-square, padded to 160 x 256
    # every candidate, not a few; 20 detections keep Mask R-CNN's mask pasting short
    kwargs = {"box_score_thresh": 0.0, "box_detections_per_img": 20} if box_head else {"score_thresh": 0.0}
    ours = randomised(build_detector(name, K, "resnet18", box_head=box_head or "2fc", **kwargs), seed=3, head_std=0.03)
    meta = {"num_classes": K, "detector": name, "backbone": "resnet18"}
    out = export_file(tmp_path, ours.state_dict(), meta, "torchvision")
    # torchvision's transform resizes the short side to min_size: at 150 / 230 the image keeps its size
    theirs = torchvision_detector(name, "resnet18", box_head, min_size=150, max_size=230, **kwargs)
    theirs.load_state_dict(torch.load(out, weights_only=True))  # strict: every name is torchvision's
    theirs.eval()
    with torch.no_grad():
        if box_head:
            mine, expected = ours([image])[0], theirs([image])[0]
            assert len(expected["boxes"]) > 0 and mine.keys() == expected.keys()
            for key in expected:
                torch.testing.assert_close(mine[key], expected[key], rtol=0, atol=0)
        else:  # our dense detectors drop output 0 after the head (ForegroundLabelsOnly): the heads' outputs
            x = ours.transform([image])[0].tensors
            features, expected_features = list(ours.backbone(x).values()), list(theirs.backbone(x).values())
            for a, b in zip(features, expected_features):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for key, value in theirs.head(expected_features).items():
                torch.testing.assert_close(ours.head(features)[key], value, rtol=0, atol=0)


@pytest.fixture(scope="module")
def finals(shapes, tmp_path_factory):
    """One model_final.pth of each script, from one iteration on the synthetic set: {script: path}."""
    root, one_thread = tmp_path_factory.mktemp("finals"), {"OMP_NUM_THREADS": "1"}
    cache = str(root / "cache")
    runs = {
        "direct.py": ["--detector", "maskrcnn", "--direct-size", "64", "--batch-size", "2", "--warmup-iters", "1",
                      *SMALL, "--roi-batch-size", "8"],
        "finetune.py": ["--detector", "fasterrcnn", "--box-head", "2fc", "--init", "scratch", "--batch-size", "2",
                        "--iters", "1", "--warmup-iters", "1", "--no-eval", *TINY],
        "montage.py": ["--backbone", "resnet18", "--montage-size", "64", "--montage-split", "32", "--batch-size", "4",
                       "--iters", "1", "--warmup-iters", "1", "--montage-erf-every", "2", "--montage-erf-batch", "2",
                       "--workers", "0", "--no-tb", "--device", "cpu", "--data-cache", cache],
        "predet.py": ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--predet-dim", "32",
                      "--predet-num-queries", "4", "--predet-post-nms", "32", "--predet-neg", "16", "--predet-pre-nms",
                      "200", "--batch-size", "2", "--iters", "1", "--warmup-iters", "1", "--workers", "0", "--no-tb",
                      "--device", "cpu"],
        "alignDet.py": ["--batch-size", "1", "--iters", "1", "--warmup-iters", "1", "--align-dense-samples", "256",
                        *TINY, "--detector", "fasterrcnn", "--backbone-weights", "scratch", "--align-proposal-method",
                        "random", "--data-cache", cache],
    }
    paths = {}
    for script, flags in runs.items():
        run_script(script, *flags, *shapes, "--max-iters", "1", "--output-dir", root / script, env=one_thread)
        paths[script] = str(root / script / "model_final.pth")
    return paths


def expected_names(fmt, holds, meta):
    """{name: shape} of everything the framework's model of the checkpoint's architecture has."""
    backbone = meta["backbone"]
    if fmt == "timm" or holds == "backbone":
        names = {"torchvision": getattr(torchvision.models, backbone)().state_dict(),
                 "timm": timm.create_model(backbone).state_dict(),
                 "detectron2": {moco_name(k): v for k, v in getattr(torchvision.models, backbone)().state_dict().items()},
                 "mmdet": getattr(torchvision.models, backbone)().state_dict()}[fmt]
        return {k: tuple(v.shape) for k, v in names.items()}
    depth, masks = int(backbone[len("resnet"):]), meta["detector"] == "maskrcnn"
    if fmt == "torchvision":
        model = torchvision_detector(meta["detector"], backbone, meta.get("box_head"), meta.get("num_classes", K),
                                     norm_layer=torch.nn.BatchNorm2d)  # BatchNorm2d: every BN name, the counter too
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = detectron2_names if fmt == "detectron2" else mmdet_names
    return names(depth, meta["box_head"], masks, meta.get("num_classes", K))


def test_every_scripts_checkpoint_exports_to_every_format_and_reads_back_the_same(finals, tmp_path, capsys):
    for script, path in finals.items():
        ckpt = checkpoint.load(path, kind="final")
        state, meta = ckpt["model"], ckpt["meta"]
        for fmt in formats.FORMATS:
            out = str(tmp_path / f"{script}.{fmt}.{FORMAT_EXT[fmt]}")
            cli.run(export.main, export.get_args_parser(), [path, "--to", fmt, "--out", out])
            printed = capsys.readouterr().out
            holds = "backbone" if fmt == "timm" or script == "montage.py" else "detector"
            assert f"{out}: {fmt}, the {holds}" in printed and "use it: " in printed, printed
            exported = read_as_framework(fmt, out)
            # every tensor of the parts the file holds, under a name of the framework's model, at its shape
            written = [k for k in state if (holds == "detector" or part_of(k) == "backbone")
                       and not (fmt == "detectron2" and k.endswith("num_batches_tracked"))]
            allowed = expected_names(fmt, holds, meta)
            assert len(exported) == len(written), (script, fmt)
            for name, value in exported.items():
                assert name in allowed, (script, fmt, name)
                assert tuple(value.shape) == allowed[name], (script, fmt, name)
            # what --init reads back is the checkpoint's (the background rows detectron2 / MMDetection lack: zeros)
            back = checkpoint.load(out, kind="final")
            assert set(back["model"]) == set(written), (script, fmt)
            for key in written:
                value = back["model"][key]
                if key.startswith(("roi_heads.box_predictor.bbox_pred", "roi_heads.mask_predictor.mask_fcn_logits")) \
                        and fmt in ("detectron2", "mmdet"):
                    rows = 4 if "bbox_pred" in key else 1
                    assert not value[:rows].any() and torch.equal(value[rows:], state[key][rows:]), (script, fmt, key)
                else:
                    assert torch.equal(value, state[key]), (script, fmt, key)
            assert back["meta"]["backbone"] == meta["backbone"]
            # and exports again to the same file's content: export -> import -> export is the identity
            again = str(tmp_path / f"again.{FORMAT_EXT[fmt]}")
            cli.run(export.main, export.get_args_parser(), [out, "--to", fmt, "--out", again])
            twice = read_as_framework(fmt, again)
            assert twice.keys() == exported.keys() and all(torch.equal(twice[k], exported[k]) for k in exported)
    capsys.readouterr()


def test_a_head_the_format_has_no_names_for_is_refused_in_one_line(tmp_path, capsys):
    model = build_detector("retinanet", K, "resnet18")
    src = str(tmp_path / "model_final.pth")
    checkpoint.save({"kind": "final", "model": checkpoint.final_state(model),
                     "meta": {"method": "aligndet", "detector": "retinanet", "backbone": "resnet18"}}, src)
    proc = run_script("common.export", src, "--to", "detectron2", "--out", tmp_path / "x.pkl", expect_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: detectron2 has no names here for 20 tensors of "
                                                   "this retinanet") and "--backbone-only" in lines[0], proc.stderr
    with pytest.raises(cli.UserError, match="mmdet has no names here for 20 tensors of this retinanet"):
        export.main(export.get_args_parser().parse_args([src, "--to", "mmdet", "--out", str(tmp_path / "x.pth")]))
    assert not (tmp_path / "x.pkl").exists() and not (tmp_path / "x.pth").exists()
    export.main(export.get_args_parser().parse_args([src, "--to", "mmdet", "--out", str(tmp_path / "r.pth"),
                                                     "--backbone-only"]))
    assert "fpn                 0 written, 16 left out: --backbone-only" in capsys.readouterr().out


def test_a_pkl_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "ran"),)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Payload()}, "__author__": "x"}))
    with pytest.raises(cli.UserError, match=r"evil.pkl: refused: \w+\.system is not an array or a plain container"):
        checkpoint.load(str(path), kind="final")
    assert not (tmp_path / "ran").exists()
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "x"})[:-5])  # cut short
    with pytest.raises(cli.UserError, match=r"evil.pkl: not a readable pickle"):
        checkpoint.load(str(path), kind="final")


def test_finetune_starts_from_a_torchvision_resnet_and_a_detectron2_pkl(shapes, tmp_path):
    """The weights of another framework fine-tune with finetune.py --init: the architecture read from them, a
    transfer report, and the frozen layers (stem + res2, BN) after a step still the file's own."""
    sources = {}
    tv = randomised(torchvision.models.resnet18(), seed=4).state_dict()  # with fc and BN step counters
    torch.save(tv, tmp_path / "resnet18_torchvision.pth")
    sources["resnet18_torchvision.pth"] = tv
    moco = randomised(torchvision.models.resnet18(), seed=5).state_dict()
    with open(tmp_path / "resnet18_moco.pkl", "wb") as f:  # as MoCo's converter writes it
        pickle.dump({"model": {moco_name(k): v.numpy() for k, v in moco.items()}, "__author__": "MOCO",
                     "matching_heuristics": True}, f)
    sources["resnet18_moco.pkl"] = moco
    flags = [f for f in TINY if f not in ("--backbone", "resnet18")]
    for name, source in sources.items():
        out = tmp_path / name.split(".")[0]
        proc = run_script("finetune.py", "--init", tmp_path / name, "--detector", "fasterrcnn", "--batch-size", "2",
                          "--iters", "1", "--warmup-iters", "1", "--no-eval", *flags, *shapes, "--output-dir", out)
        assert "--backbone resnet18: the checkpoint's (its meta)" in proc.stdout, proc.stdout
        classifier = "stem.fc.weight, stem.fc.bias" if name.endswith(".pkl") else "fc.weight, fc.bias"
        assert f"left out, a classifier: {classifier}" in proc.stdout, proc.stdout
        assert re.search(r"backbone\s+100\s+0\s+0\s+0\s+0", proc.stdout), proc.stdout  # 100 loaded, none missing
        final = torch.load(out / "model_final.pth", weights_only=True)["model"]
        frozen = [k for k in source if k.startswith(("conv1.", "layer1.")) or ".bn" in k or k.startswith("bn1.")
                  or "downsample.1" in k]
        for key in frozen:
            if "num_batches" not in key:
                assert torch.equal(final[f"backbone.body.{key}"], source[key]), (name, key)


# ---- the frameworks themselves, where they import (not in make test's environment) ----
def real_rcnn(depth, box_head, seed=6):
    state = randomised(build_detector("maskrcnn", K, f"resnet{depth}", norm="bn", box_head=box_head), seed).state_dict()
    return state, {"num_classes": K, "backbone": f"resnet{depth}", "detector": "maskrcnn", "box_head": box_head}


def same_rcnn_outputs(ours_state, backbone_fpn, rpn_head, box_head_and_predictor, mask_head, depth, box_head):
    """Our detector's FPN, RPN head, box head and mask head outputs against the framework's model's, on the same
    inputs; the framework's class layout: background last, no background deltas or mask."""
    ours = build_detector("maskrcnn", K, f"resnet{depth}", norm="bn", box_head=box_head).eval()
    ours.load_state_dict(ours_state)
    x, rois = torch.randn(1, 3, 96, 160), torch.randn(5, 256, 7, 7)

    def close(a, b):  # float32: the frameworks' convolutions may sum in another order (measured: 4e-7 of the range)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))

    with torch.no_grad():
        features, expected = backbone_fpn(x), list(ours.backbone(x).values())
        for a, b in zip(features, expected):
            close(a, b)
        for a, b in zip([t for pair in rpn_head(features) for t in pair], [t for pair in ours.rpn.head(expected) for t in pair]):
            close(a, b)
        scores, deltas = box_head_and_predictor(rois)
        our_scores, our_deltas = ours.roi_heads.box_predictor(ours.roi_heads.box_head(rois))
        close(scores, torch.cat([our_scores[:, 1:], our_scores[:, :1]], 1))
        close(deltas, our_deltas[:, 4:])
        masks = ours.roi_heads.mask_predictor(ours.roi_heads.mask_head(rois.repeat(1, 1, 2, 2)))
        close(mask_head(rois.repeat(1, 1, 2, 2)), masks[:, 1:])


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="MMDetection 3.x is not installed")
@pytest.mark.parametrize("depth, box_head", [(18, "4conv1fc"), (50, "2fc")])
def test_mmdetection_loads_them_for_real(tmp_path, depth, box_head):
    import mmdet
    from mmengine.config import Config
    from mmengine.runner.checkpoint import load_checkpoint
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    state, meta = real_rcnn(depth, box_head)
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/_base_/models/mask-rcnn_r50_fpn.py"))
    cfg.model.backbone.update(depth=depth, init_cfg=None)
    cfg.model.neck.in_channels = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
    cfg.model.roi_head.bbox_head.update(num_classes=K, type="Shared4Conv1FCBBoxHead" if box_head == "4conv1fc"
                                        else "Shared2FCBBoxHead")
    cfg.model.roi_head.mask_head.num_classes = K
    model = MODELS.build(cfg.model).eval()
    load_checkpoint(model, export_file(tmp_path, state, meta, "mmdet"), strict=True)  # load_from's loader
    same_rcnn_outputs(state, lambda x: model.neck(model.backbone(x)), model.rpn_head,
                      model.roi_head.bbox_head, model.roi_head.mask_head, depth, box_head)
    backbone = MODELS.build(dict(cfg.model.backbone, init_cfg=dict(
        type="Pretrained", checkpoint=export_file(tmp_path, state, meta, "mmdet", backbone_only=True))))
    backbone.init_weights()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[f"backbone.body.{key}"]), key


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is None, reason="detectron2 is not installed")
@pytest.mark.parametrize("depth, box_head", [(18, "4conv1fc"), (50, "2fc")])
def test_detectron2_loads_them_for_real(tmp_path, depth, box_head):
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    state, meta = real_rcnn(depth, box_head)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.STRIDE_IN_1X1", False,
                         "MODEL.ROI_HEADS.NUM_CLASSES", K] + ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64] * (depth < 50)
                        + ["MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "MODEL.ROI_BOX_HEAD.NUM_FC", 1] * (box_head == "4conv1fc"))
    model = build_model(cfg).eval()
    checkpointer = DetectionCheckpointer(model)
    for backbone_only in (False, True):
        loaded = checkpointer._load_model(checkpointer._load_file(
            export_file(tmp_path, state, meta, "detectron2", backbone_only)))  # with its matching heuristics
        missing = {k for k in loaded.missing_keys if k.startswith("backbone.bottom_up.") or not backbone_only}
        assert not missing and not loaded.unexpected_keys, loaded
    same_rcnn_outputs(state, lambda x: list(model.backbone(x).values()), model.proposal_generator.rpn_head,
                      lambda r: model.roi_heads.box_predictor(model.roi_heads.box_head(r)),
                      model.roi_heads.mask_head.layers, depth, box_head)
