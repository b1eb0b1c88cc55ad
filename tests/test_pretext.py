"""The pretexts' measures against chance (common.pretext) and the learning check that reads them (common.claims):
known answers from the definitions, and each loss equal to its chance level exactly where the prediction ignores
the image (which fails if a measure is averaged otherwise than its loss)."""
import math

import pytest
import torch
import torch.nn.functional as F

import alignDet
import montage
from common import claims
from common.pretext import contrastive_measures, soft_target_measures


def test_contrastive_measures_by_hand():
    """Two queries, four candidates (non-square, rows unlike each other). Row 0: positive 0 (weight 1/2), negatives
    1-3. Row 1: positives 1 and 2 (1/4 each), negatives 0 and 3, candidate 0 more similar than positive 1."""
    cos = torch.tensor([[0.9, 0.2, -0.1, 0.5],
                        [0.35, 0.3, 0.8, 0.0]])
    positive = torch.tensor([[True, False, False, False], [False, True, True, False]])
    negative = torch.tensor([[False, True, True, True], [True, False, False, True]])
    weight = torch.tensor([[0.5, 0, 0, 0], [0, 0.25, 0.25, 0]])
    m = contrastive_measures("x", torch.tensor(2.0), cos, positive, negative, weight)
    chance = 0.5 * math.log(4) + 0.5 * math.log(3)  # ln(1 + 3 negatives), ln(1 + 2 negatives)
    assert m["x_chance"].item() == pytest.approx(chance)
    assert m["x_vs_chance"].item() == pytest.approx(2.0 - chance)
    assert m["x_acc1"].item() == pytest.approx(0.5 + 0.25)  # 0.3 < 0.35: row 1's first pair misses
    assert m["x_acc1_chance"].item() == pytest.approx(0.5 / 4 + 0.5 / 3)
    # gaps: 0.9 - mean(0.2, -0.1, 0.5) = 0.7; 0.3 and 0.8 - mean(0.35, 0.0) = 0.125, 0.625
    assert m["x_cos_gap"].item() == pytest.approx(0.5 * 0.7 + 0.25 * 0.125 + 0.25 * 0.625)


def test_soft_target_measures_by_hand():
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    prior = torch.tensor([0.5, 0.25, 0.25])
    m = soft_target_measures("c", torch.tensor(1.0), targets, prior, torch.tensor([0.25, 0.75]))
    chance = 0.25 * (0.5 * math.log(2) + 0.5 * math.log(4)) + 0.75 * math.log(4)
    assert m["c_chance"].item() == pytest.approx(chance)
    assert m["c_floor"].item() == pytest.approx(0.25 * math.log(2))  # the second target is certain: entropy 0
    assert m["c_vs_chance"].item() == pytest.approx(1.0 - chance)


def test_aligndet_loss_is_at_chance_when_all_embeddings_are_equal():
    """Equal embeddings make every similarity equal: each (query, key) pair's loss is then ln(1 + its negatives).
    The ids have 1, 2 and 3 samples and a background sample, so their negative counts differ (9, 8, 7 of the bank
    of 12) and only a chance averaged as the loss averages (per id, then over ids) equals the loss."""
    ids = torch.tensor([1, 2, 2, 3, 3, 3, 0])
    key_ids = torch.tensor([1, 2, 3, 3, 0])
    loss, m = alignDet.box_contrastive_loss(torch.ones(7, 5), ids, torch.ones(5, 5), key_ids, 0.5)
    per_id = [math.log(1 + 12 - 2), math.log(1 + 12 - 3), math.log(1 + 12 - 5)]  # bank 7 + 5; same-id samples out
    assert loss.item() == pytest.approx(sum(per_id) / 3)
    assert m["contrast_chance"].item() == pytest.approx(loss.item())
    assert m["contrast_vs_chance"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["contrast_cos_gap"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["contrast_acc1"].item() == 0  # a tie is not a retrieval


def test_aligndet_measures_see_retrieval_that_the_raw_loss_hides():
    """Keys equal to their queries, other ids orthogonal: top-1 retrieval is perfect and the cosine gap 1, while
    at temperature 0.5 the loss stays a sizeable fraction of its chance (logit gap 2)."""
    q = torch.eye(6)[:4]  # [4, 6]: four orthogonal embeddings
    ids = torch.tensor([1, 2, 3, 4])
    loss, m = alignDet.box_contrastive_loss(q, ids, q.clone(), ids, 0.5)
    chance = math.log(1 + 6)  # bank of 8, the query's own online and teacher copies are not negatives
    assert m["contrast_chance"].item() == pytest.approx(chance)
    assert m["contrast_acc1"].item() == 1.0 and m["contrast_cos_gap"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(math.log(1 + 6 * math.exp(-2)))
    assert m["contrast_acc1_chance"].item() == pytest.approx(1 / 7)


@pytest.mark.parametrize("kind", ["erf", "blockwise", "global"])
def test_montage_loss_is_at_chance_when_it_predicts_the_blind_prior(kind):
    """Logits equal to the log of what the region priors predict at each position (erf: mixed by the ERF label
    weights; blockwise: each region's prior; global: their area-weighted mix): the loss equals its chance. A 3 x 4
    map with a 1-cell / 3-cell split (regions of 1, 2, 3 and 6 cells: an average over positions instead of per
    region would differ)."""
    cell_region = torch.tensor([[0, 1, 1, 1], [2, 3, 3, 3], [2, 3, 3, 3]])
    labels = torch.tensor([[1, 0, 2, 1], [2, 2, 0, 1]])
    prior = torch.softmax(torch.randn(4, 3), 1)  # 4 regions x (K + 1)
    weights = torch.softmax(torch.randn(4, 3, 4), 0)  # 4 x h x w, sums to 1 over regions
    cells = F.one_hot(cell_region, 4).permute(2, 0, 1).float()
    if kind == "erf":
        blind = torch.einsum("ijk,ic->cjk", weights, prior)
    elif kind == "blockwise":
        blind = torch.einsum("ijk,ic->cjk", cells, prior)
    else:
        blind = ((cells.sum((1, 2)) / 12) @ prior)[:, None, None].expand(3, 3, 4)
    logits = blind.log()[None].repeat(2, 1, 1, 1)  # B x (K+1) x h x w
    loss, m = montage.montage_loss(logits, labels, cell_region, kind, weights, prior)
    assert m["cls_chance"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert m["cls_vs_chance"].item() == pytest.approx(0.0, abs=1e-5)


def _meta(method, first, last, **extra):
    return {"method": method, "losses_first": first, "losses_last": last, **extra}


def test_the_learning_check_reads_the_measure_against_chance():
    """Learned: the measure falls by at least the protocol's fall and ends below chance. A raw loss that rises
    while the measure falls (AlignDet's chance drifts up as its RPN finds the pseudo boxes) is learning."""
    key, fall = claims.PRETEXT_MEASURE["aligndet"]
    first = {"loss_contrast": 4.20, key: -0.22, "contrast_acc1": 0.20, "contrast_acc1_chance": 0.01}
    learned = {"loss_contrast": 4.45, key: -0.22 - fall, "contrast_acc1": 0.45, "contrast_acc1_chance": 0.01}
    (ok, text), = claims.pretext_checks(_meta("aligndet", first, learned), 0.2)
    assert ok is True and text.startswith(f"aligndet {key} -0.220 -> {-0.22 - fall:+.3f} nats")
    assert "top-1 0.20 -> 0.45, chance 0.01" in text
    short = dict(learned, **{key: -0.22 - fall + 0.01})
    assert claims.pretext_checks(_meta("aligndet", first, short), 0.2)[0][0] is False
    above = {key: fall - 0.05}  # fell by the fall, but from above chance to above chance: the prior, not the pretext
    assert claims.pretext_checks(_meta("aligndet", {key: 2 * fall}, above), 0.2)[0][0] is False


def test_the_learning_check_picks_each_stage_measure():
    """PreDet: L_info's measure; its L_cls-only ablation (no info_*): L_cls's. Montage: its dense loss's. Every stage
    of a chain is checked (AlignDet's Montage backbone). Direct and stages logged before the measures: the raw loss's
    relative fall."""
    pd = claims.pretext_checks(_meta("predet", {"info_vs_chance": -0.1, "cls_vs_chance": 0.0},
                                     {"info_vs_chance": -1.0, "cls_vs_chance": 0.0}), 0.2)
    assert pd[0][0] is True and pd[0][1].startswith("predet info_vs_chance")
    cls_only = claims.pretext_checks(_meta("predet", {"cls_vs_chance": 0.0}, {"cls_vs_chance": -0.5}), 0.2)
    assert cls_only[0][0] is True and cls_only[0][1].startswith("predet-cls cls_vs_chance")
    chain = _meta("aligndet", {"contrast_vs_chance": -0.2}, {"contrast_vs_chance": -0.9},
                  backbone_meta=_meta("montage", {"cls_vs_chance": 0.05}, {"cls_vs_chance": 0.0}))
    assert [ok for ok, _ in claims.pretext_checks(chain, 0.2)] == [True, False]
    assert claims.pretext_checks(_meta("direct", {"loss": 2.0}, {"loss": 1.6}), 0.2)[0][0] is True
    assert claims.pretext_checks(_meta("direct", {"loss": 2.0}, {"loss": 1.61}), 0.2)[0][0] is False
    v3 = claims.pretext_checks(_meta("aligndet", {"loss_contrast": 4.2}, {"loss_contrast": 4.5}), 0.2)
    assert v3 == [(False, "aligndet loss_contrast 4.200 -> 4.500 (learned if <= 3.360)")]
