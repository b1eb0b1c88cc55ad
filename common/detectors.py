"""Detector builders on ``torchvision.models.detection``, BatchNorm modes, and state-dict part names.

``build_detector("fasterrcnn"|"maskrcnn"|"retinanet"|"fcos", num_classes, backbone="resnet50", ...)``
returns a torchvision detector whose backbone is a ResNet-FPN (``resnet18/34/50/101``):
- R-CNNs: P2-P6 FPN (no norm), torchvision's RPN, RoIAlign 7x7 and the box head ``4conv1fc``
  (4 conv3x3-256 + fc1024, no norm: the head of the Direct, PreDet and AlignDet papers) or ``2fc``
  (torchvision's default TwoMLPHead);
- RetinaNet: P3-P7 (P6 from P5, torchvision v1; mmdet builds P6 from C5), head without norm;
- FCOS: P3-P7, torchvision's head (GroupNorm(32) towers, GIoU loss, center sampling; mmdet's
  FCOS used by AlignDet has no center sampling and an IoU loss; documented departure).
Backbone norm modes: ``frozen`` (FrozenBatchNorm2d: statistics and affine fixed, the Direct paper's
'Fixed'), ``affine`` (statistics fixed, gamma/beta trained), ``bn`` (plain per-GPU BatchNorm),
``syncbn`` (SyncBatchNorm across GPUs). ``num_classes`` counts the foreground classes K: labels are
1..K and every head gets K + 1 outputs (index 0 = background / unused). RetinaNet and FCOS never emit
label 0 (``ForegroundLabelsOnly``).
"""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from common import dist
from common.errors import Unavailable, UserError
from common.transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_mean_std

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen", "affine", "bn", "syncbn")
BOX_HEADS = ("4conv1fc", "2fc")


class AffineBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics stay fixed (always normalises with them) while gamma and beta
    train: the 'affine' mode of the Direct paper's Table 2. Same state-dict keys as nn.BatchNorm2d."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "affine": AffineBatchNorm2d, "bn": nn.BatchNorm2d,
               "syncbn": nn.BatchNorm2d}


def round_up(x, multiple):
    return -(-x // multiple) * multiple


class PresizedTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform without its resize: the loader's preset already sized the images,
    so the model only normalises them and batches them on a canvas (zero padding at the right and bottom;
    ``canvas_size``). pad_multiple 32 is torchvision's own padding (each side of the largest image up to a
    multiple of 32); a larger multiple (of 32) draws the canvases from a few sizes, capped at ``max_side`` (the
    preset's largest side) rounded up to 32, so that the convolutions see few input shapes."""

    def __init__(self, pad_multiple=32, max_side=None):
        super().__init__(min_size=1, max_size=1, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        self.pad_multiple, self.max_side = pad_multiple, max_side

    def resize(self, image, target=None):
        return image, target

    def canvas_size(self, sizes):
        """(H, W) of the canvas for images of these (h, w) sizes: each side of the largest up to a multiple of
        pad_multiple, capped at max_side rounded up to 32, and never under a multiple of 32."""
        def side(x):
            canvas = round_up(x, self.pad_multiple)
            if self.max_side is not None:
                canvas = min(canvas, round_up(self.max_side, 32))
            return max(round_up(x, 32), canvas)
        return side(max(h for h, _ in sizes)), side(max(w for _, w in sizes))

    def batch_images(self, images, size_divisible=32):  # size_divisible: torchvision's, replaced by the canvas
        height, width = self.canvas_size([img.shape[-2:] for img in images])
        batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
        for img, canvas in zip(images, batch):
            canvas[:, :img.shape[-2], :img.shape[-1]].copy_(img)
        return batch

    def normalize(self, image):  # torchvision's makes mean and std on the device for every image (a host sync)
        mean, std = imagenet_mean_std(image.device, image.dtype)
        return (image - mean[0]) / std[0]


class ForegroundLabelsOnly:
    """Mixin for torchvision's RetinaNet / FCOS built with K + 1 sigmoid outputs: output 0 can never be a label.

    torchvision's dense detectors use the label as the index of the sigmoid output (focal loss one-hot on
    the label; at inference the label is the output's index). With labels 1..K, output 0 is trained as a
    negative everywhere and has no class behind it, yet torchvision's postprocess would emit it as label 0
    whenever its score passed the threshold, and label 0 has no category (COCO export would have to guess).
    Its logits are set to -inf before torchvision's postprocess, so output 0 scores 0, falls under every
    score threshold and takes none of the top-k candidate slots: no real (1..K) detection is lost and no
    detection gets a wrong category. K + 1 outputs are kept (rather than K with shifted labels) so that
    training, the checkpoints' shapes and AlignDet's heads stay as they are."""

    def postprocess_detections(self, head_outputs, anchors, image_sizes):
        # head_outputs["cls_logits"]: one [B, HW_l x A, K + 1] tensor per level
        unused = [logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device), float("-inf"))
                  for logits in head_outputs["cls_logits"]]
        return super().postprocess_detections(dict(head_outputs, cls_logits=unused), anchors, image_sizes)


class DenseRetinaNet(ForegroundLabelsOnly, RetinaNet):
    """torchvision's RetinaNet that never emits label 0 (same modules and state dict)."""


class DenseFCOS(ForegroundLabelsOnly, FCOS):
    """torchvision's FCOS that never emits label 0 (same modules and state dict)."""


def add_detector_args(parser, detector="maskrcnn", backbone="resnet50", bn="frozen", trainable_layers=3):
    g = parser.add_argument_group("detector")
    g.add_argument("--detector", default=detector, help="|".join(DETECTORS))
    g.add_argument("--backbone", default=backbone, help="|".join(BACKBONES))
    g.add_argument("--box-head", default="4conv1fc", choices=BOX_HEADS, help="R-CNN box head")
    g.add_argument("--bn", default=bn, choices=NORMS, help="backbone norm mode")
    g.add_argument("--trainable-layers", type=int, default=trainable_layers,
                   help="trainable ResNet stages counted from the top (5 = all, 3 = stem+res2 frozen)")
    g.add_argument("--rpn-batch-size", type=int, default=256, help="anchors sampled per image for the RPN loss")
    g.add_argument("--roi-batch-size", type=int, default=512, help="RoIs sampled per image for the box head")
    g.add_argument("--rpn-post-nms-train", type=int, default=2000, help="RPN proposals kept per image in training")
    g.add_argument("--rpn-post-nms-test", type=int, default=1000, help="RPN proposals kept per image at test time")
    g.add_argument("--detections-per-img", type=int, default=100)
    g.add_argument("--anchor-scale", type=float, default=1.0,
                   help="multiplies the anchor sizes (32..512 px on P2/P3..P6/P7); e.g. 0.5 for small images")
    return g


# On CUDA batches are padded to canvases whose sides are multiples of 160 = 5 x 32: 640 and 800, the ends of the
# presets' short sides, are canvas sides. Measured on coco128 over 300 iterations (aspect-grouped batches): the
# 1333x800 fine-tune at batch 4 sees 6 canvas shapes instead of 13 for 3% more pixels than padding to 32, and
# AlignDet's multiscale views at batch 2 see 13 instead of 93 for 12% more (of the multiples 64 to 256 tried,
# those above 160 save at most 2 shapes and pad 5-30% more pixels than 160).
PAD_MULTIPLE_CUDA = 160


def add_pad_multiple_arg(group):
    group.add_argument("--pad-multiple", type=int, default=None,
                       help="pad each batch to a canvas whose sides are multiples of N px (capped at the preset's "
                            "long side rounded up to 32), so that the convolutions see a few input shapes; 32 = "
                            f"torchvision's padding (default: {PAD_MULTIPLE_CUDA} on CUDA, 32 on the CPU). The "
                            "padding holds anchors and points, all negatives")


def pad_multiple_for(args, device):
    """--pad-multiple, or its default on ``device``."""
    if args.pad_multiple is None:
        return PAD_MULTIPLE_CUDA if device.type == "cuda" else 32
    if args.pad_multiple < 32 or args.pad_multiple % 32:
        raise UserError(f"--pad-multiple {args.pad_multiple}: expected a multiple of 32 (32 = torchvision's padding)")
    return args.pad_multiple


def check_detector_args(args, device):
    if args.detector not in DETECTORS:
        raise UserError(f"--detector {args.detector}: unknown detector (expected one of {', '.join(DETECTORS)})")
    if args.backbone not in BACKBONES:
        raise UserError(f"--backbone {args.backbone}: unknown backbone (expected one of {', '.join(BACKBONES)})")
    if args.trainable_layers is not None and not 0 <= args.trainable_layers <= 5:  # None: set by a recipe
        raise UserError(f"--trainable-layers {args.trainable_layers}: expected 0..5")
    if args.bn == "syncbn" and (dist.get_world_size() == 1 or device.type != "cuda"):
        raise UserError("--bn syncbn needs several GPU processes (torchrun --nproc_per_node>1 on CUDA); "
                        "use --bn bn")


def detector_kwargs(args):
    """Sampling/proposal/anchor settings of the flags, in the names of torchvision's constructors."""
    sizes = [round(s * args.anchor_scale) for s in (32, 64, 128, 256, 512)]
    if args.detector in ("fasterrcnn", "maskrcnn"):
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
        return dict(rpn_anchor_generator=anchors, rpn_batch_size_per_image=args.rpn_batch_size, box_batch_size_per_image=args.roi_batch_size,
                    rpn_pre_nms_top_n_train=args.rpn_post_nms_train, rpn_post_nms_top_n_train=args.rpn_post_nms_train,
                    rpn_pre_nms_top_n_test=args.rpn_post_nms_test, rpn_post_nms_top_n_test=args.rpn_post_nms_test,
                    box_detections_per_img=args.detections_per_img)
    if args.detector == "retinanet":  # 3 scales per octave, as torchvision's default
        anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                                  ((0.5, 1.0, 2.0),) * 5)
        return dict(anchor_generator=anchors, detections_per_img=args.detections_per_img)
    return dict(detections_per_img=args.detections_per_img)  # FCOS: anchor-free


def imagenet_weights(backbone):
    """torchvision's ImageNet-1k weights enum for a ResNet (the classic V1 weights detection uses)."""
    return torchvision.models.get_model_weights(backbone).IMAGENET1K_V1


def build_backbone(backbone, norm="frozen", trainable_layers=3, imagenet=False, returned_layers=None,
                   extra_blocks=None):
    """ResNet + FPN (torchvision ``BackboneWithFPN``: ``.body`` = the ResNet stages, ``.fpn``)."""
    try:
        model = resnet_fpn_backbone(backbone_name=backbone, weights=imagenet_weights(backbone) if imagenet else None,
                                    norm_layer=NORM_LAYERS[norm], trainable_layers=trainable_layers,
                                    returned_layers=returned_layers, extra_blocks=extra_blocks)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        if not imagenet:
            raise
        raise Unavailable(f"could not get torchvision's ImageNet weights for {backbone} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); they are downloaded on first use, so this needs "
                        "network access once (or a copy in $TORCH_HOME/hub/checkpoints)") from None
    return model


def build_box_head(box_head):
    """The R-CNN box head on 256x7x7 RoI features -> 1024: '4conv1fc' (no norm) or '2fc'."""
    if box_head == "4conv1fc":
        return FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=None)
    return TwoMLPHead(256 * 7 * 7, 1024)


def build_detector(name, num_classes, backbone="resnet50", norm="frozen", box_head="4conv1fc",
                   trainable_layers=3, imagenet=False, pad_multiple=32, max_side=None, **kwargs):
    """A torchvision detector for K = num_classes foreground classes, batching its images on the canvases of
    (pad_multiple, max_side) (``PresizedTransform``); kwargs go to its constructor."""
    k1 = num_classes + 1
    if name in ("fasterrcnn", "maskrcnn"):
        body = build_backbone(backbone, norm, trainable_layers, imagenet)
        head = build_box_head(box_head)
        predictor = FastRCNNPredictor(1024, k1)
        if name == "fasterrcnn":
            model = FasterRCNN(body, None, box_head=head, box_predictor=predictor, **kwargs)
        else:
            model = MaskRCNN(body, None, box_head=head, box_predictor=predictor,
                             mask_predictor=MaskRCNNPredictor(256, 256, k1), **kwargs)
    elif name in ("retinanet", "fcos"):
        body = build_backbone(backbone, norm, trainable_layers, imagenet, returned_layers=[2, 3, 4],
                              extra_blocks=LastLevelP6P7(256, 256))
        model = (DenseRetinaNet if name == "retinanet" else DenseFCOS)(body, k1, **kwargs)
    else:
        raise UserError(f"unknown detector {name!r} (expected one of {', '.join(DETECTORS)})")
    model.transform = PresizedTransform(pad_multiple, max_side)
    if norm == "syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_detector_from_args(args, num_classes, imagenet=False, pad_multiple=32, max_side=None):
    return build_detector(args.detector, num_classes, args.backbone, args.bn, args.box_head,
                          args.trainable_layers, imagenet, pad_multiple, max_side, **detector_kwargs(args))


# ---- naming the parts of a detector's state dict (transfer reports, partial loads, exports) ----
PARTS = (  # (key prefix, part name); the first match wins
    ("backbone.body.", "backbone"),
    ("backbone.fpn.", "fpn"),
    ("rpn.", "rpn"),
    ("roi_heads.box_head.", "box_head"),
    ("roi_heads.box_predictor.", "box_predictor"),
    ("roi_heads.mask_head.", "mask_head"),
    ("roi_heads.mask_predictor.", "mask_predictor"),
    ("head.classification_head.conv.", "cls_tower"),
    ("head.classification_head.", "classifier"),
    ("head.regression_head.conv.", "reg_tower"),
    ("head.regression_head.bbox_ctrness.", "centerness"),
    ("head.regression_head.", "regressor"),
)
PART_NAMES = [p for _, p in PARTS] + ["other"]
# the final class/box layers of each detector: what AlignDet drops before fine-tuning
FINAL_LAYERS = ("box_predictor", "mask_predictor", "classifier", "regressor", "centerness")


def part_of(key):
    for prefix, part in PARTS:
        if key.startswith(prefix):
            return part
    return "other"


def parts_of(state_dict):
    return sorted({part_of(k) for k in state_dict}, key=PART_NAMES.index)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
