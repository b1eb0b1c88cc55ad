"""Boxes, masks and instance ids follow the image through flips, resizes and crops."""
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.coco import CocoDetection
from common.transforms import eval_resize, per_instance, train_augment, train_resize
from conftest import write_scene

RED, BLUE = (250, 10, 10), (10, 10, 250)


def scene(h=120, w=200):
    """A grey image with a red box at (20, 30)-(80, 70) and a blue one at (120, 50)-(190, 110)."""
    img = torch.full((3, h, w), 128, dtype=torch.uint8)
    boxes = [(20, 30, 80, 70), (120, 50, 190, 110)]
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    for i, ((x0, y0, x1, y1), colour) in enumerate(zip(boxes, (RED, BLUE))):
        img[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
        masks[i, y0:y1, x0:x1] = 1
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)),
              "labels": torch.tensor([1, 2]), "ids": torch.tensor([7, 9]), "masks": tv_tensors.Mask(masks)}
    return tv_tensors.Image(img), target


def check_alignment(img, target):
    """Inside each box (shrunk by 2 px against interpolation) the pixels have the box's colour, and the
    mask covers the box."""
    colours = {1: RED, 2: BLUE}
    for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
        x0, y0, x1, y1 = box.round().int().tolist()
        patch = img[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].float()
        assert patch.numel() > 0
        expected = torch.tensor(colours[int(label)], dtype=torch.float32)[:, None, None]
        assert (patch - expected).abs().max() < 30, f"box {box.tolist()} is off its pixels"
        assert mask[y0 + 2:y1 - 2, x0 + 2:x1 - 2].all() and mask.sum() <= (x1 - x0 + 2) * (y1 - y0 + 2)


def test_flip_moves_boxes_masks_and_keeps_ids():
    img, target = scene()
    out_img, out = v2.Compose([v2.RandomHorizontalFlip(1.0)])(img, target)
    assert out["boxes"][0].tolist() == [200 - 80, 30, 200 - 20, 70]
    assert out["ids"].tolist() == [7, 9]
    check_alignment(out_img, out)


def test_train_preset_resizes_at_load_and_flips_consistently(tmp_path):
    """The load-time resize scales the image and boxes and rasterises the polygon masks at the new size."""
    torch.manual_seed(0)
    images, ann = write_scene(str(tmp_path), 120, 200, [(20, 30, 80, 70), (120, 50, 190, 110)], (RED, BLUE))
    ds = CocoDetection(images, ann, train_augment(), with_masks=True, resize=train_resize("cpu"))
    flipped = 0
    for _ in range(12):  # random flips
        out_img, out = ds[0]
        assert tuple(out_img.shape[-2:]) == (115, 192)  # 128 short side would make the long side 213 > 192
        assert out["masks"].shape[-2:] == out_img.shape[-2:]
        check_alignment(out_img, out)
        flipped += int(out["boxes"][0, 0] > out["boxes"][1, 0])
    assert 0 < flipped < 12


def test_eval_preset_sizes_short_side():
    img, _ = scene(100, 120)
    out = eval_resize("800")(img)
    assert tuple(out.shape[-2:]) == (800, 960)
    img, _ = scene(100, 400)  # long side capped at 1333
    assert tuple(eval_resize("800")(img).shape[-2:]) == (333, 1333)


def test_crop_drops_boxes_outside_and_filters_labels_and_ids_together():
    img, target = scene()
    crop = v2.Compose([v2.RandomCrop((100, 100)), v2.ClampBoundingBoxes(),
                       v2.SanitizeBoundingBoxes(labels_getter=per_instance)])
    seen_one = False
    for seed in range(30):
        torch.manual_seed(seed)
        out_img, out = crop(img, target)
        n = len(out["boxes"])
        assert len(out["labels"]) == len(out["ids"]) == len(out["masks"]) == n
        for lab, i in zip(out["labels"].tolist(), out["ids"].tolist()):
            assert {1: 7, 2: 9}[lab] == i
        # a clipped box still covers only its own colour
        for box, lab in zip(out["boxes"], out["labels"].tolist()):
            x0, y0, x1, y1 = box.round().int().tolist()
            if x1 - x0 > 4 and y1 - y0 > 4:
                patch = out_img[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1].float().mean((1, 2))
                assert (patch - torch.tensor({1: RED, 2: BLUE}[lab]).float()).abs().max() < 5
        seen_one |= n == 1
    assert seen_one, "some crop should cut one box away"
