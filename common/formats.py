"""The names other frameworks give this repository's weights, both ways: ``python -m common.export`` writes them,
``checkpoint.load`` (so ``finetune.py --init``) reads them back.

A model_final.pth holds a torchvision detector's state dict: ``backbone.body`` (the ResNet), ``backbone.fpn``,
``rpn``, ``roi_heads`` (or RetinaNet's / FCOS's ``head``); Montage's holds the ResNet alone. One table per
format maps a torchvision detection name to the framework's, in templates: ``{i}`` is a number carried over,
``{i+2}`` that number plus 2 on that side, ``*`` the rest of the name. A third column limits a row to one R-CNN
box head, where two heads share the framework's name (detectron2's ``fc1``). torchvision and timm need no table:
timm's ResNet keeps torchvision's names. The backbone alone (``--backbone-only``, or a checkpoint of the ResNet
only) is the table's backbone names without ``BACKBONE_PREFIX``: a torchvision / timm ResNet state dict, and for
detectron2 MoCo's layout (``stem.conv1.weight``, ``res2.0.conv1.weight``, ...), which its checkpointer matches by
suffix. Values change in one place: torchvision's R-CNN class layers put the background class first and also
regress boxes and predict masks for it; detectron2's and MMDetection's put it last and have no such rows
(torchvision never uses them: they are dropped on export and come back as zeros on import).
"""
import collections
import pickle
import re

import torch

from common.detectors import FINAL_LAYERS, part_of
from common.errors import UserError

FORMATS = ("torchvision", "timm", "detectron2", "mmdet")
FOR_RCNN = "R-CNN detectors (Faster / Mask R-CNN on a P2-P6 FPN, box head 4conv1fc or 2fc)"

DETECTRON2 = (  # torchvision -> detectron2 (detectron2/modeling/...), each group's source beside it
    # backbone/resnet.py: BasicStem 'stem'; stages 'res2'..'res5'; a block's norm inside its conv; 'shortcut'
    ("backbone.body.conv1.weight", "backbone.bottom_up.stem.conv1.weight"),
    ("backbone.body.bn1.*", "backbone.bottom_up.stem.conv1.norm.*"),
    ("backbone.body.layer{s}.{b}.conv{c}.weight", "backbone.bottom_up.res{s+1}.{b}.conv{c}.weight"),
    ("backbone.body.layer{s}.{b}.bn{c}.*", "backbone.bottom_up.res{s+1}.{b}.conv{c}.norm.*"),
    ("backbone.body.layer{s}.{b}.downsample.0.weight", "backbone.bottom_up.res{s+1}.{b}.shortcut.weight"),
    ("backbone.body.layer{s}.{b}.downsample.1.*", "backbone.bottom_up.res{s+1}.{b}.shortcut.norm.*"),
    # backbone/fpn.py: 'fpn_lateral<k>' / 'fpn_output<k>' for the input of stride 2^k (res2: k = 2)
    ("backbone.fpn.inner_blocks.{i}.0.*", "backbone.fpn_lateral{i+2}.*"),
    ("backbone.fpn.layer_blocks.{i}.0.*", "backbone.fpn_output{i+2}.*"),
    # proposal_generator/rpn.py: StandardRPNHead, the model's 'proposal_generator.rpn_head'
    ("rpn.head.conv.0.0.*", "proposal_generator.rpn_head.conv.*"),
    ("rpn.head.cls_logits.*", "proposal_generator.rpn_head.objectness_logits.*"),
    ("rpn.head.bbox_pred.*", "proposal_generator.rpn_head.anchor_deltas.*"),
    # roi_heads/box_head.py: FastRCNNConvFCHead, 'conv1'.. then 'fc1'..
    ("roi_heads.box_head.{i}.0.*", "roi_heads.box_head.conv{i+1}.*", "4conv1fc"),
    ("roi_heads.box_head.5.*", "roi_heads.box_head.fc1.*", "4conv1fc"),
    ("roi_heads.box_head.fc6.*", "roi_heads.box_head.fc1.*", "2fc"),
    ("roi_heads.box_head.fc7.*", "roi_heads.box_head.fc2.*", "2fc"),
    # roi_heads/fast_rcnn.py: FastRCNNOutputLayers
    ("roi_heads.box_predictor.cls_score.*", "roi_heads.box_predictor.cls_score.*"),
    ("roi_heads.box_predictor.bbox_pred.*", "roi_heads.box_predictor.bbox_pred.*"),
    # roi_heads/mask_head.py: MaskRCNNConvUpsampleHead
    ("roi_heads.mask_head.{i}.0.*", "roi_heads.mask_head.mask_fcn{i+1}.*"),
    ("roi_heads.mask_predictor.conv5_mask.*", "roi_heads.mask_head.deconv.*"),
    ("roi_heads.mask_predictor.mask_fcn_logits.*", "roi_heads.mask_head.predictor.*"),
)

MMDET = (  # torchvision -> MMDetection 3.x (mmdet/models/...)
    # backbones/resnet.py: ResNet keeps torchvision's names (conv1, bn1, layer1-4, downsample.0 / .1)
    ("backbone.body.*", "backbone.*"),
    # necks/fpn.py: ConvModule lists, the conv inside as '.conv'
    ("backbone.fpn.inner_blocks.{i}.0.*", "neck.lateral_convs.{i}.conv.*"),
    ("backbone.fpn.layer_blocks.{i}.0.*", "neck.fpn_convs.{i}.conv.*"),
    # dense_heads/rpn_head.py: RPNHead (one conv)
    ("rpn.head.conv.0.0.*", "rpn_head.rpn_conv.*"),
    ("rpn.head.cls_logits.*", "rpn_head.rpn_cls.*"),
    ("rpn.head.bbox_pred.*", "rpn_head.rpn_reg.*"),
    # roi_heads/bbox_heads/convfc_bbox_head.py: Shared4Conv1FCBBoxHead / Shared2FCBBoxHead; bbox_head.py
    ("roi_heads.box_head.{i}.0.*", "roi_head.bbox_head.shared_convs.{i}.conv.*", "4conv1fc"),
    ("roi_heads.box_head.5.*", "roi_head.bbox_head.shared_fcs.0.*", "4conv1fc"),
    ("roi_heads.box_head.fc6.*", "roi_head.bbox_head.shared_fcs.0.*", "2fc"),
    ("roi_heads.box_head.fc7.*", "roi_head.bbox_head.shared_fcs.1.*", "2fc"),
    ("roi_heads.box_predictor.cls_score.*", "roi_head.bbox_head.fc_cls.*"),
    ("roi_heads.box_predictor.bbox_pred.*", "roi_head.bbox_head.fc_reg.*"),
    # roi_heads/mask_heads/fcn_mask_head.py: FCNMaskHead
    ("roi_heads.mask_head.{i}.0.*", "roi_head.mask_head.convs.{i}.conv.*"),
    ("roi_heads.mask_predictor.conv5_mask.*", "roi_head.mask_head.upsample.*"),
    ("roi_heads.mask_predictor.mask_fcn_logits.*", "roi_head.mask_head.conv_logits.*"),
)

TABLES = {"torchvision": (("*", "*"),), "timm": (("*", "*"),), "detectron2": DETECTRON2, "mmdet": MMDET}
BACKBONE_PREFIX = {"torchvision": "backbone.body.", "timm": "backbone.body.", "detectron2": "backbone.bottom_up.",
                   "mmdet": "backbone."}
# a 4conv1fc box head has its first conv under this name (else the head is 2fc)
FIRST_BOX_CONV = {"torchvision": "roi_heads.box_head.0.", "detectron2": "roi_heads.box_head.conv1.",
                  "mmdet": "roi_head.bbox_head.shared_convs.0."}
# a classification backbone's classifier, in the backbone-alone names (MoCo's converter puts its MLP under stem.)
CLASSIFIERS = ("fc.", "linear.", "stem.fc.")

# (torchvision prefix, rows per class): the R-CNN layers whose first dimension runs over the K + 1 classes
CLASS_ROWS = (("roi_heads.box_predictor.cls_score.", 0), ("roi_heads.box_predictor.bbox_pred.", 4),
              ("roi_heads.mask_predictor.mask_fcn_logits.", 1))


def _background_last(key, value, to_framework):
    """torchvision's class layout -> detectron2's / MMDetection's (to_framework), or back."""
    for prefix, rows in CLASS_ROWS:
        if key.startswith(prefix):
            if rows == 0:  # the scores: background first <-> last
                return torch.cat([value[1:], value[:1]]) if to_framework else torch.cat([value[-1:], value[:-1]])
            return value[rows:].clone() if to_framework else torch.cat([value.new_zeros(rows, *value.shape[1:]), value])
    return value


def _pattern(template):
    """(regex, fields) of a name template; a field is (name, offset), '*' the rest of the name."""
    regex, fields = "", []
    for token in re.split(r"(\{\w+(?:\+\d+)?\}|\*)", template):
        if token == "*":
            regex, fields = regex + "(.+)", fields + [("*", 0)]
        elif token.startswith("{"):
            name, _, offset = token[1:-1].partition("+")
            regex, fields = regex + r"(\d+)", fields + [(name, int(offset or 0))]
        else:
            regex += re.escape(token)
    return re.compile(regex + "$"), fields


def _rename(name, source, target):
    """``name`` read with template ``source`` and written with ``target``; None if it does not fit ``source``."""
    regex, fields = _pattern(source)
    match = regex.match(name)
    if match is None:
        return None
    values = {field: text if field == "*" else int(text) - offset
              for (field, offset), text in zip(fields, match.groups())}
    return re.sub(r"\{(\w+)(?:\+(\d+))?\}|\*", lambda t: values["*"] if t.group(0) == "*" else
                  str(values[t.group(1)] + int(t.group(2) or 0)), target)


def rename(name, fmt, box_head, to_framework=True):
    """One name through format ``fmt``'s table (to the framework's name, or back); None where no row fits."""
    rows = [(tv, fw) if to_framework else (fw, tv) for tv, fw, *only in TABLES[fmt] if not only or only[0] == box_head]
    names = {_rename(name, source, target) for source, target in rows} - {None}
    assert len(names) <= 1, f"{fmt}'s table maps {name} to {names}"  # one-to-one: tests/test_export.py holds it
    return names.pop() if names else None


def box_head_of(state, fmt):
    return "4conv1fc" if any(k.startswith(FIRST_BOX_CONV.get(fmt, "-")) for k in state) else "2fc"


def export(state, meta, fmt, backbone_only, source):
    """The state dict in format ``fmt``'s names: (state, holds, left_out), holds 'backbone' or 'detector',
    left_out {part: [tensors, why]}. UserError (naming ``source``) when the format has no name for a part."""
    detector_layout = fmt != "timm" and not backbone_only and any(part_of(k) != "backbone" for k in state)
    left_out, kept = collections.defaultdict(lambda: [0, ""]), {}
    for key, value in state.items():
        part = part_of(key)
        if not detector_layout and part != "backbone":
            why = "timm holds a classification backbone" if fmt == "timm" else "--backbone-only"
        elif key.endswith("num_batches_tracked") and fmt == "detectron2":
            why = "BatchNorm's step counter: detectron2's frozen BN has none"
        elif part in FINAL_LAYERS and "num_classes" not in meta:
            why = "no class count in the meta: a head only pre-training uses (AlignDet's projector)"
        else:
            kept[key] = value
            continue
        left_out[part][0] += 1
        left_out[part][1] = why
    box_head, out, unnamed = box_head_of(kept, "torchvision"), {}, []
    for key, value in kept.items():
        name = rename(key, fmt, box_head)
        if name is None:
            unnamed.append(key)
        else:
            out[name] = _background_last(key, value, True) if fmt in ("detectron2", "mmdet") else value
    if unnamed:
        parts = sorted({part_of(k) for k in unnamed})
        raise UserError(f"{source}: {fmt} has no names here for {len(unnamed)} tensors of this "
                        f"{meta.get('detector', 'detector')} ({', '.join(parts)}; e.g. {unnamed[0]}): the {fmt} "
                        f"export holds {FOR_RCNN}; --backbone-only exports the ResNet alone")
    if not detector_layout:
        out = {k[len(BACKBONE_PREFIX[fmt]):]: v for k, v in out.items()}
    return out, "detector" if detector_layout else "backbone", dict(left_out)


class _Refused(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays, nothing else: a .pkl runs no code."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name} is not an array or a plain container")
        return super().find_class(module, name)


def read_pkl(path):
    """A detectron2 .pkl ({"model": {name: array}, "__author__", ...}) as {name: tensor} plus the file's dict."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()  # latin1: Python 2 pickles, as detectron2 reads them
    except _Refused as e:
        raise UserError(f"{path}: refused: {e} (a .pkl is read without running code in it)") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "__author__" not in data:
        raise UserError(f"{path}: not detectron2's .pkl layout {{'model': {{name: array}}, '__author__': ...}} "
                        "(Detectron1 / Caffe2 blobs such as res2_0_branch2a_w are not read here)")
    try:
        return {k: torch.as_tensor(v) for k, v in data["model"].items()}, data
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its 'model' holds a value that is not a numeric array ({e})") from None


def naming(state):
    """Which names a foreign state dict uses: 'detectron2', 'mmdet', 'resnet' (torchvision's, timm's and
    MMDetection's ResNet alone) or 'torchvision' (a torchvision detector: this repository's own)."""
    if any(k.startswith(("backbone.bottom_up.", "proposal_generator.", "stem.", "res2.")) for k in state):
        return "detectron2"
    if any(k.startswith(("backbone.body.", "backbone.fpn.", "rpn.", "roi_heads.", "head.")) for k in state):
        return "torchvision"
    if any(k.startswith(("backbone.", "neck.", "rpn_head.", "roi_head.")) for k in state):
        return "mmdet"
    return "resnet" if "conv1.weight" in state else None


def resnet_of(state, prefix="backbone.body."):
    """torchvision's name of the ResNet in ``state`` (its blocks per stage, basic or bottleneck), or None."""
    blocks = [len({k.split(".")[3] for k in state if k.startswith(f"{prefix}layer{s}.")}) for s in (1, 2, 3, 4)]
    bottleneck = any(k.startswith(prefix) and ".conv3." in k for k in state)
    return {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
            ((3, 4, 23, 3), True): "resnet101"}.get((tuple(blocks), bottleneck))


def import_state(state, fmt, file_meta=None, described=None):
    """A state dict in ``fmt``'s names (detectron2, mmdet, resnet, torchvision) as a final checkpoint of this
    repository: torchvision's names, its architecture in the meta (the file's own meta, where it has one, wins)."""
    alone = fmt == "resnet" or (fmt == "detectron2" and not any(k.startswith("backbone.") for k in state))
    prefix = {"resnet": "backbone.", "detectron2": "backbone.bottom_up."}[fmt] if alone else ""
    left_out = [k for k in state if alone and k.startswith(CLASSIFIERS)]
    state = {prefix + k: v for k, v in state.items() if k not in left_out}
    table, box_head = ("mmdet" if fmt == "resnet" else fmt), box_head_of(state, fmt)
    model, renamed = {}, 0
    for key, value in state.items():
        name = key if fmt == "torchvision" else rename(key, table, box_head, to_framework=False)
        renamed += name not in (None, key)
        model[name or key] = _background_last(name, value, False) if name and fmt in ("detectron2", "mmdet") else value
    meta = {"backbone": resnet_of(model)}
    if any(part_of(k) != "backbone" for k in model):
        masks, dense = "roi_heads.mask_head.0.0.weight" in model, any(k.startswith("head.") for k in model)
        meta["detector"] = ("fcos" if any("bbox_ctrness" in k for k in model) else "retinanet") if dense else \
            "maskrcnn" if masks else "fasterrcnn"
        meta["box_head"] = None if dense else box_head_of(model, "torchvision")
    for key, outputs_per_class in (("roi_heads.box_predictor.cls_score.weight", 1),  # K + 1 classes
                                   ("head.classification_head.cls_logits.weight", 1 if meta.get("detector") == "fcos" else 9)):
        if key in model:  # RetinaNet: 9 anchors per position (this repository's and torchvision's)
            meta["num_classes"] = len(model[key]) // outputs_per_class - 1
    meta = {k: v for k, v in meta.items() if v is not None}
    described = described or {"detectron2": "a detectron2 .pkl", "mmdet": "an MMDetection checkpoint",
                              "resnet": "a ResNet state dict (torchvision / timm)", "torchvision": "a torchvision "
                              "detector's state dict"}[fmt]
    meta.update(file_meta or {}, imported={"format": described, "renamed": renamed, "left_out": left_out})
    return {"kind": "final", "model": model, "meta": meta}


def read_foreign(obj):
    """A loaded file that is not this repository's checkpoint, as one (import_state), or None: a torchvision /
    timm ResNet or a torchvision detector (a bare state dict), or an MMDetection checkpoint ({"state_dict",
    "meta"}); a detectron2 .pkl comes through read_pkl."""
    file_meta = obj.get("meta") if isinstance(obj.get("meta"), dict) and "method" in obj["meta"] else None
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        return None
    fmt = naming(state)
    if fmt is None:  # names of none of the formats: as they are (the transfer report shows what fits)
        return {"kind": "final", "model": state, "meta": file_meta or {}}
    return import_state(state, fmt, file_meta)
