"""predet.py: the CRPN/CROI cores on hand-made tensors, view geometry, exact resume, transfer to finetune.py."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

import predet
from common import cli
from conftest import TINY, iteration_losses, run_script

PD = ["--backbone", "resnet18", "--preset", "cpu", "--anchor-scale", "0.5", "--predet-dim", "32",
      "--predet-num-queries", "4", "--predet-post-nms", "32", "--predet-neg", "16", "--predet-pre-nms", "200",
      "--batch-size", "2", "--iters", "3", "--warmup-iters", "1", "--workers", "0", "--print-freq", "1",
      "--no-tb", "--device", "cpu"]


def parse(*flags):
    args = predet.get_args_parser().parse_args(list(flags))
    predet.check_args(args, torch.device("cpu"))
    return args


# ---- CRPN
def test_crpn_scores_equal_explicit_loop_and_group_convolution():
    torch.manual_seed(0)
    B, A, D, H, W, Q = 2, 3, 5, 4, 6, 4
    feats, queries = torch.randn(B, A, D, H, W), torch.randn(B, Q, A, D)
    scores = predet.crpn_scores(feats, queries)
    loop = torch.zeros(B, Q, A, H, W)
    for b in range(B):
        for q in range(Q):
            for a in range(A):
                for y in range(H):
                    for x in range(W):
                        loop[b, q, a, y, x] = feats[b, a, :, y, x] @ queries[b, q, a]
    assert torch.allclose(scores, loop, atol=1e-5)
    for b in range(B):  # the paper's 1x1 group convolution: A groups, query vectors as weights
        weight = queries[b].permute(1, 0, 2).reshape(A * Q, D, 1, 1)
        out = F.conv2d(feats[b].reshape(1, A * D, H, W), weight, groups=A).view(A, Q, H, W)
        assert torch.allclose(out.permute(1, 0, 2, 3), scores[b], atol=1e-5)


def test_crpn_labels_follow_max_iou_and_thresholds():
    queries = torch.tensor([[0., 0., 10., 10.], [50., 50., 70., 70.]])
    anchors = torch.tensor([[0., 0., 10., 10.],     # IoU 1 with q0 -> positive, q0
                            [0., 0., 10., 12.],     # IoU 0.83 with q0 -> positive
                            [0., 0., 10., 20.],     # IoU 0.5 -> ignored
                            [50., 50., 60., 60.],   # IoU 0.25 with q1 -> negative, q1
                            [200., 200., 210., 210.]])  # IoU 0 with both -> negative, random query
    matched, labels = predet.crpn_labels(anchors, queries, low_quality=False)
    assert labels.tolist() == [1, 1, -1, 0, 0]
    assert matched[:4].tolist() == [0, 0, 0, 1] and 0 <= matched[4] < 2
    _, labels = predet.crpn_labels(anchors, queries, low_quality=True)
    assert labels.tolist() == [1, 1, -1, 1, 0]  # q1's best anchor becomes positive (d2 matcher)


def test_crpn_sampling_is_128_positives_and_128_negatives():
    args = parse()
    sampler = predet.det_utils.BalancedPositiveNegativeSampler(args.predet_crpn_batch, args.predet_crpn_pos_fraction)
    labels = torch.cat([torch.ones(300), torch.zeros(1000), -torch.ones(50)])
    pos, neg = (m[0] for m in sampler([labels]))
    assert pos.sum() == 128 and neg.sum() == 128 and (labels[pos.bool()] == 1).all()


# ---- CRPN anchors: on the view's grid, in the order of the CRPN's scores
def view_levels(model, h, w):
    """A [1, 3, h, w] view and its P2-P6 feature maps."""
    view = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        feats = model.backbone(view)
    return view, [feats[k] for k in ("0", "1", "2", "3", "pool")]


def test_crpn_anchors_tile_the_whole_view_at_every_level():
    model = predet.PreDet(parse("--anchor-scale", "0.5"), num_classes=5)  # sizes 16..256, ratios 0.5, 1, 2
    h, w = 128, 192  # non-square, so that a swapped axis cannot pass
    view, levels = view_levels(model, h, w)
    anchors = model.view_anchors(view, levels)[0]
    start = 0
    for level, stride in enumerate((4, 8, 16, 32, 64)):  # P2..P6
        n = (h // stride) * (w // stride) * 3
        a = anchors[start:start + n]
        start += n
        centres = (a[:, :2] + a[:, 2:]) / 2
        assert sorted(set(centres[:, 0].tolist())) == [stride * k for k in range(w // stride)], level
        assert sorted(set(centres[:, 1].tolist())) == [stride * k for k in range(h // stride)], level
        areas = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).sqrt()
        assert torch.allclose(areas, torch.full_like(areas, 16.0 * 2 ** level), rtol=0.02), level
    assert start == len(anchors)


def test_a_query_anywhere_in_the_view_gets_positive_anchors_on_it():
    model = predet.PreDet(parse(), num_classes=5)
    view, levels = view_levels(model, 128, 192)
    anchors = model.view_anchors(view, levels)[0]
    for query in ([150., 90., 182., 122.], [4., 100., 36., 124.], [100., 8., 164., 72.], [60., 40., 124., 104.]):
        q = torch.tensor([query])
        _, labels = predet.crpn_labels(anchors, q, low_quality=False)  # strict IoU > 0.7
        pos = anchors[labels == 1]
        assert len(pos) > 0, query
        centres = (pos[:, :2] + pos[:, 2:]) / 2
        assert ((centres >= q[:, :2]) & (centres <= q[:, 2:])).all(), (query, pos)


def test_crpn_scores_are_ordered_like_the_anchors():
    """A feature that is non-zero at one place of one level scores exactly the anchors centred there."""
    torch.manual_seed(0)
    model = predet.PreDet(parse("--predet-dim", "4"), num_classes=5)
    crpn = model.crpn
    with torch.no_grad():  # the 3x3 conv passes channel 0 through, each anchor's D features = channel 0
        crpn.conv[0][0].weight.zero_()
        crpn.conv[0][0].weight[0, 0, 1, 1] = 1.0
        crpn.anchor_cls.weight.zero_()
        crpn.anchor_cls.weight[:, 0] = 1.0
        crpn.query_cls.weight.zero_()
        crpn.query_cls.bias.fill_(1.0)
    view, levels = view_levels(model, 128, 192)
    for level, (y, x) in ((0, (27, 41)), (2, (5, 9)), (4, (1, 2))):
        feats = [torch.zeros_like(f) for f in levels]
        feats[level][0, 0, y, x] = 1.0
        with torch.no_grad():
            scores, _ = crpn(feats, torch.zeros(1, 2, 256 * 7 * 7))  # [1, Q, N]
        anchors = model.view_anchors(view, feats)[0]
        hit = anchors[scores[0, 0] != 0]
        stride = 4 * 2 ** level
        assert len(hit) == 3, level  # the A = 3 anchors of that place
        centres = (hit[:, :2] + hit[:, 2:]) / 2
        assert centres.tolist() == [[x * stride, y * stride]] * 3, level


# ---- CROI
def test_info_nce_matches_the_paper_formula_and_pulls_the_positive_up():
    torch.manual_seed(0)
    s_pos = torch.rand(3, requires_grad=True)
    s_neg = torch.rand(3, 5) * 2 - 1
    tau = 0.07
    loss = predet.info_nce(s_pos, s_neg, tau)
    sp, sn = s_pos.tolist(), s_neg.tolist()
    by_hand = [-math.log(math.exp(sp[q] / tau) / (math.exp(sp[q] / tau) + sum(math.exp(v / tau) for v in sn[q])))
               for q in range(3)]
    assert torch.allclose(loss, torch.tensor(by_hand), rtol=1e-5)
    loss.mean().backward()
    assert (s_pos.grad < 0).all()  # descending the loss raises the positive's similarity
    sim = torch.eye(4)  # cosines of 4 orthogonal embeddings; query q's positive is box pos[q], the rest negatives

    def loss(pos):
        rest = torch.ones(4, 4, dtype=torch.bool)
        rest[torch.arange(4), pos] = False
        return predet.info_nce(sim[torch.arange(4), pos], sim[rest].view(4, 3), tau).mean()
    assert loss(torch.arange(4)) < 1e-4 and loss(torch.arange(4).roll(1)) > 10  # identical vs permuted


def test_croi_regression_targets_decode_back_to_the_query():
    model = predet.PreDet(parse(), num_classes=5)
    proposals = torch.tensor([[10., 12., 50., 40.], [0., 0., 30., 30.]])
    queries = torch.tensor([[12., 10., 48., 44.], [2., 1., 33., 25.]])
    targets = model.croi_coder.encode_single(queries, proposals)
    assert torch.allclose(model.croi_coder.decode_single(targets, proposals), queries, atol=1e-4)
    b_q, b_p = torch.randn(2, 1024), torch.randn(2, 1024)  # deltas = (4 x D projection of b_q) . (D of b_p)
    by_hand = torch.stack([model.croi.reg_query(b_q[i]).view(4, -1) @ model.croi.reg_proposal(b_p[i])
                           for i in range(2)])
    assert torch.allclose(model.croi.deltas(b_q, b_p), by_hand, atol=1e-6)


# ---- data
def gradient_image(h=150, w=220):
    """Red encodes x, green encodes y: a box's mean colour says where in the image it is."""
    x = torch.linspace(0, 255, w)[None].expand(h, w)
    y = torch.linspace(0, 255, h)[:, None].expand(h, w)
    return tv_tensors.Image(torch.stack([x, y, torch.full((h, w), 128.)]).round().to(torch.uint8))


def test_queries_cover_the_same_content_in_both_views_and_labels_are_k_hot():
    torch.manual_seed(0)
    args = parse()
    transform = predet.TwoViewsWithQueries(128, 5, args)
    transform.photometric = lambda img: img  # geometry only
    image = gradient_image()
    target = {"image_id": 1, "labels": torch.tensor([2, 5, 2])}
    for _ in range(10):
        views, info = transform(image, target)
        q1, q2 = info["queries1"], info["queries2"]
        assert views.shape == (2, 3, 128, 128) and 1 <= len(q1) == len(q2) <= 16
        assert (q1 >= 0).all() and (q1 <= 128).all() and (q2 >= 0).all() and (q2 <= 128).all()
        for b1, b2 in zip(q1.round().int().tolist(), q2.round().int().tolist()):
            mean1 = views[0, :2, b1[1] + 1:b1[3] - 1, b1[0] + 1:b1[2] - 1].float().mean((1, 2))
            mean2 = views[1, :2, b2[1] + 1:b2[3] - 1, b2[0] + 1:b2[2] - 1].float().mean((1, 2))
            # flips mirror red (x): compare its distance from the middle, and green (y) directly
            assert abs(abs(mean1[0] - 127.5) - abs(mean2[0] - 127.5)) < 8 and abs(mean1[1] - mean2[1]) < 8
        assert info["cls_target"].tolist() == [0, 1, 0, 0, 1]


def test_proposals_outside_the_overlap_of_the_two_crops_are_dropped():
    args = parse("--predet-query-nms", "1.0")
    proposals = {1: torch.tensor([[0., 0., 40., 40.],        # outside the overlap
                                  [90., 90., 140., 140.],    # inside
                                  [60., 70., 120., 110.]])}  # partly inside: clipped
    transform = predet.TwoViewsWithQueries(128, 5, args, proposals)
    crops = [(0, 0, 150, 150), (80, 80, 150, 150)]  # (top, left, h, w): overlap (80, 80)-(150, 150)
    queries = transform.sample_queries(1, (80, 80, 150, 150), crops)
    assert sorted(queries.tolist()) == [[80., 80., 120., 110.], [90., 90., 140., 140.]]


# ---- the script end to end
def test_resume_is_exact_and_finetune_loads_the_pretrained_parts(shapes, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script("predet.py", *PD, *shapes, "--output-dir", full)
    run_script("predet.py", *PD, *shapes, "--max-iters", "1", "--output-dir", part)
    run_script("predet.py", *PD, *shapes, "--output-dir", part, "--resume", "auto")
    a, b = iteration_losses(full), iteration_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for it in (2, 3):
        assert b[it] == pytest.approx(a[it], rel=1e-6), (it, a, b)
    terms = iteration_losses(full, "loss_info")
    assert len(terms) == 3 and all(math.isfinite(v) for v in terms.values())

    final = torch.load(f"{full}/model_final.pth", weights_only=True)
    assert final["meta"]["method"] == "predet" and final["meta"]["images_seen"] == 6
    assert final["meta"]["parts"] == ["backbone", "fpn", "rpn", "box_head"]
    proc = run_script("finetune.py", "--detector", "fasterrcnn", "--init", f"{full}/model_final.pth", "--iters", "1",
                      "--batch-size", "2", "--warmup-iters", "1", *TINY, *shapes, "--output-dir", str(tmp_path / "ft"))
    report = {m[0]: list(map(int, m[1:])) for m in
              re.findall(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", proc.stdout, re.M)}
    for part_name in ("backbone", "fpn", "box_head"):
        loaded, missing = report[part_name][:2]
        assert loaded > 0 and missing == 0, (part_name, report)
    assert report["rpn"][:2] == [2, 4]  # the 3x3 conv transfers; objectness and deltas start fresh
    assert report["box_predictor"][:2] == [0, 4]
    ft = json.load(open(tmp_path / "ft" / "results.json"))
    assert ft["init_method"] == "predet" and "AP" in ft["bbox"]
    # PreDet sec. 4.2: fine-tuned without freezing any layer, BN trains
    assert "--bn bn: the recipe's" in proc.stdout and "--trainable-layers 5: the recipe's" in proc.stdout
    assert (ft["finetune"]["recipe"]["bn"], ft["finetune"]["recipe"]["trainable_layers"]) == ("bn", 5)

    # Fig. 5b analysis works on any checkpoint of the repo, here the fine-tuned one
    out = tmp_path / "sim"
    proc = run_script("common.similarity", tmp_path / "ft" / "model_final.pth", "--size", "128", "--images", "2",
                      "--device", "cpu", *shapes, "--output-dir", out)
    table = json.load(open(out / "similarity.json"))
    assert table["method"] == "finetune" and -1 <= table["medium"]["pearson"] <= 1
    assert (out / "similarity.png").stat().st_size > 0 and "Pearson r(IoU, cosine similarity)" in proc.stdout


def test_ablation_flags_export_only_the_trained_parts(shapes, tmp_path):
    run_script("predet.py", *PD, *shapes, "--iters", "1", "--predet-no-crpn", "--predet-no-croi-reg",
               "--output-dir", str(tmp_path / "a"))
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.txt")]
    assert "loss_info" in log[0] and "loss_crpn_cls" not in log[0] and "loss_croi_reg" not in log[0]
    meta = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["meta"]
    assert meta["parts"] == ["backbone", "fpn", "box_head"]


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "vgg16"], "--backbone vgg16: unknown backbone"),
    (["--predet-queries", "proposals"], "--predet-queries proposals needs --proposals FILE"),
    (["--predet-no-cls", "--predet-no-det"], "every loss term is switched off"),
])
def test_user_errors_are_one_line(shapes, tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # in-process: these checks come before any data or model
        cli.run(predet.main, predet.get_args_parser(), [*PD, *shapes, "--output-dir", str(tmp_path / "x"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
