"""The two-stage family's pieces on hand-made arrays (milliseconds each)."""

import numpy as np
import tensorflow as tf

from tfkarpa import kcv
from tfkarpa.models.rcnn import heads, losses, proposals, roi, targets


def _bilinear(feature, y, x):
    """crop_and_resize's read of one point (array indices): 0 outside the map."""
    height, width = feature.shape[:2]
    if not (0 <= y <= height - 1 and 0 <= x <= width - 1):
        return np.zeros(feature.shape[-1])
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    dy, dx = y - y0, x - x0
    return ((1 - dy) * (1 - dx) * feature[y0, x0] + (1 - dy) * dx * feature[y0, x1]
            + dy * (1 - dx) * feature[y1, x0] + dy * dx * feature[y1, x1])


def _roi_align(feature, box, stride, out, sampling):
    """RoI Align by its definition: the mean of sampling^2 points spread evenly in each bin."""
    x0, y0, x1, y1 = np.asarray(box, np.float64) / stride
    bin_h, bin_w = (y1 - y0) / out, (x1 - x0) / out
    result = np.zeros((out, out, feature.shape[-1]))
    for i in range(out):
        for j in range(out):
            points = [_bilinear(feature, y0 + (i + (a + 0.5) / sampling) * bin_h - 0.5,
                                x0 + (j + (b + 0.5) / sampling) * bin_w - 0.5)
                      for a in range(sampling) for b in range(sampling)]
            result[i, j] = np.mean(points, axis=0)
    return result


def test_roi_align_matches_its_definition():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 9, 12, 3)).astype(np.float32)
    boxes = np.array([[0, 0, 48, 36], [5.5, 3.25, 30.5, 17.75], [40, 20, 60, 40],  # past the edge
                      [-6, -2, 10, 9], [13, 13, 14, 15]], np.float32)  # a 1x2-pixel box
    images = np.array([0, 1, 1, 0, 1], np.int32)
    for out, sampling in ((7, 2), (3, 1), (4, 3)):
        got = roi.roi_align_level(tf.constant(features), tf.constant(boxes), tf.constant(images),
                                  4.0, out, sampling).numpy()
        with roi.portable():  # the gathers TFLite files carry: the same numbers
            portable = roi.roi_align_level(tf.constant(features), tf.constant(boxes),
                                           tf.constant(images), 4.0, out, sampling).numpy()
        assert got.shape == (5, out, out, 3)
        np.testing.assert_allclose(portable, got, atol=1e-5)
        for k, (box, image) in enumerate(zip(boxes, images)):
            want = _roi_align(features[image], box, 4.0, out, sampling)
            np.testing.assert_allclose(got[k], want, atol=1e-5, err_msg=f"box {k}, {out}x{sampling}")


def test_a_constant_map_gives_its_constant_inside_and_zero_outside():
    features = tf.fill([1, 8, 8, 2], 3.0)
    got = roi.roi_align_level(features, tf.constant([[4.0, 4.0, 28.0, 20.0], [40, 40, 60, 60]]),
                              tf.constant([0, 0]), 4.0).numpy()
    np.testing.assert_allclose(got[0], 3.0, atol=1e-6)
    np.testing.assert_allclose(got[1], 0.0)


def test_pyramid_levels_follow_the_fpn_rule():
    sides = np.array([8, 111, 112, 223, 224, 447, 448, 2000], np.float32)
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], -1)
    levels = roi.pyramid_levels(tf.constant(boxes), 2, 5).numpy()
    np.testing.assert_array_equal(levels, [2, 2, 3, 3, 4, 4, 5, 5])
    wide = roi.pyramid_levels(tf.constant([[0.0, 0.0, 448.0, 112.0]]), 2, 5).numpy()
    assert wide[0] == 4  # sqrt(448 * 112) = 224


def test_multilevel_roi_align_cuts_each_box_from_its_level_in_box_order():
    rng = np.random.default_rng(1)
    pyramid = {level: tf.constant(rng.normal(size=(2, 256 // 2 ** level, 256 // 2 ** level, 4)),
                                  tf.float32) for level in (3, 4, 5)}
    boxes = np.array([[[10, 10, 250, 250], [0, 0, 30, 30], [20, 40, 140, 150]],
                      [[5, 5, 60, 45], [100, 100, 240, 250], [0, 0, 250, 60]]], np.float32)
    # canonical_level=5 (a 224-pixel box on level 5) spreads boxes this small over every level.
    got = roi.multilevel_roi_align(pyramid, tf.constant(boxes), 5, 2, canonical_level=5).numpy()
    with roi.portable():  # TFLite's way: every box on every level, its own kept
        portable = roi.multilevel_roi_align(pyramid, tf.constant(boxes), 5, 2,
                                            canonical_level=5).numpy()
    np.testing.assert_allclose(portable, got, atol=1e-5)
    assert got.shape == (2, 3, 5, 5, 4)
    levels = roi.pyramid_levels(tf.constant(boxes), 3, 5, canonical_level=5).numpy()
    assert set(levels.ravel()) == {3, 4, 5}  # the case exercises every level
    for b in range(2):
        for n in range(3):
            level = int(levels[b, n])
            want = _roi_align(pyramid[level].numpy()[b], boxes[b, n], 2.0 ** level, 5, 2)
            np.testing.assert_allclose(got[b, n], want, atol=1e-5)


# ------------------------------------------------------------------------------ targets


def test_deltas_move_anchors_onto_boxes_and_back():
    anchors = tf.constant([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    boxes = tf.constant([[2.0, 1.0, 12.0, 21.0], [5.0, 5.0, 25.0, 15.0]])
    deltas = targets.encode(boxes, anchors, (10.0, 10.0, 5.0, 5.0))
    # box 0: centre (7, 11) from (5, 5) in 10-pixel anchors, same width, twice the height
    np.testing.assert_allclose(deltas[0], [10 * 0.2, 10 * 0.6, 0.0, 5 * np.log(2.0)], atol=1e-5)
    np.testing.assert_allclose(deltas[1], 0.0, atol=1e-6)  # an anchor that is its box
    np.testing.assert_allclose(targets.decode(deltas, anchors, (10.0, 10.0, 5.0, 5.0)), boxes,
                               atol=1e-4)
    huge = targets.decode(tf.constant([[0.0, 0.0, 50.0, 50.0]]), anchors[:1]).numpy()
    assert np.all(np.isfinite(huge)) and huge[0, 2] - huge[0, 0] <= 10 * 1000 / 16 + 1e-3


def test_matching_labels_positives_negatives_ignored_and_padding():
    # One image, 5 anchors, 3 true-box slots of which the last is padding.
    iou = tf.constant([[[0.80, 0.10, 0.95],   # positive for box 0 (padding's 0.95 ignored)
                        [0.50, 0.20, 0.00],   # between the thresholds: ignored
                        [0.10, 0.20, 0.00],   # negative
                        [0.05, 0.40, 0.00],   # box 1's best anchor: positive though 0.4 < 0.7
                        [0.05, 0.40, 0.00]]])  # ties with it: positive too
    valid = tf.constant([[True, True, False]])
    index, labels = targets.match(iou, valid, 0.3, 0.7)
    np.testing.assert_array_equal(labels[0], [1, -1, 0, 1, 1])
    np.testing.assert_array_equal(index.numpy()[0, [0, 3, 4]], [0, 1, 1])
    _, plain = targets.match(iou, valid, 0.3, 0.7, best_anchor_positive=False)
    np.testing.assert_array_equal(plain[0], [1, -1, 0, -1, -1])
    # An image whose every slot is padding: all anchors negative, matched to "none" (index M).
    index, labels = targets.match(iou, tf.zeros_like(valid), 0.3, 0.7)
    np.testing.assert_array_equal(labels[0], [0] * 5)
    np.testing.assert_array_equal(index[0], [3] * 5)


def test_sampling_keeps_the_share_of_positives_and_never_takes_ignored():
    labels = tf.constant([[1] * 30 + [-1] * 20 + [0] * 50, [1] * 2 + [-1] * 8 + [0] * 90])
    for seed in range(5):
        chosen = targets.sample(labels, 40, 0.25, seed=seed).numpy()
        lab = labels.numpy()
        assert chosen.sum(1).tolist() == [40, 40]
        assert (chosen & (lab == 1)).sum(1).tolist() == [10, 2]  # capped at 10, or all there are
        assert not (chosen & (lab == -1)).any()


def test_anchor_targets_on_a_hand_made_image():
    generator = kcv.load().layers.AnchorGenerator(
        bounding_box_format="xyxy", sizes=[16], scales=[1.0], aspect_ratios=[1.0], strides=[8])
    anchors = generator(image_shape=(64, 64, 3))[0]  # 8 x 8 anchors of 16 px, 8 px apart
    # One box exactly on the anchor centred at (20, 20), one padding slot.
    boxes = tf.constant([[[12.0, 12.0, 28.0, 28.0], [0.0, 0.0, 0.0, 0.0]]])
    out = targets.anchor_targets(anchors, boxes, tf.constant([[True, False]]), size=16, seed=1)
    objectness, weight = out["objectness"][0].numpy(), out["objectness_weight"][0].numpy()
    on_box = 2 * 8 + 2
    assert objectness[on_box] == 1 and objectness.sum() == 1  # its neighbours overlap < 0.7
    assert weight[on_box] == 1 and weight.sum() == 16  # the positive and 15 negatives
    np.testing.assert_allclose(out["deltas"][0, on_box], 0.0, atol=1e-6)
    assert out["delta_weight"][0].numpy().sum() == 1 and out["delta_weight"][0, on_box] == 1
    # Anchors half a stride off overlap it by 1/3: neither positive nor negative.
    iou = targets.pairwise_iou(anchors, boxes)[0, :, 0].numpy()
    assert abs(iou[on_box + 1] - 8 * 16 / (2 * 256 - 8 * 16)) < 1e-6
    assert weight[on_box + 1] == 0


def test_mask_targets_cut_each_proposal_from_its_own_mask():
    masks = np.zeros((1, 2, 32, 32), bool)
    masks[0, 0, 8:24, 4:20] = True  # box 0: a 16 x 16 square at x 4-20, y 8-24
    masks[0, 1, 0:8, 24:32] = True  # box 1: elsewhere
    proposals = tf.constant([[[4.0, 8.0, 20.0, 24.0],    # exactly box 0
                              [4.0, 8.0, 36.0, 24.0],    # twice as wide: left half is box 0
                              [4.0, 8.0, 20.0, 24.0]]])  # matched to "none"
    got = targets.mask_targets(tf.constant(masks), proposals, tf.constant([[0, 0, 2]]), 8).numpy()
    assert got.shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(got[0, 0], 1.0)
    np.testing.assert_array_equal(got[0, 1][:, :4], 1.0)
    np.testing.assert_array_equal(got[0, 1][:, 4:], 0.0)  # box 1's pixels are not box 0's
    np.testing.assert_array_equal(got[0, 2], 0.0)


# ------------------------------------------------------------------------------ proposals


def test_proposals_keep_the_best_of_overlapping_boxes_clip_and_pad():
    anchors = tf.constant([[0.0, 0.0, 20.0, 20.0],    # best score
                           [1.0, 1.0, 21.0, 21.0],    # overlaps anchor 0 by 0.82: suppressed
                           [30.0, 30.0, 50.0, 50.0],  # apart: kept
                           [40.0, 0.0, 42.0, 2.0],    # 2 px: under min_size 4, dropped
                           [50.0, 50.0, 80.0, 80.0]])  # crosses the 64-px image: clipped
    logits = tf.constant([[4.0, 3.0, 2.0, 5.0, 1.0]])
    deltas = tf.zeros([1, 5, 4])
    boxes, scores, valid = proposals.propose(logits, deltas, anchors, (64, 64), pre_nms=5,
                                             post_nms=4, iou=0.7, min_size=4.0)
    assert valid.numpy().tolist() == [[True, True, True, False]]
    np.testing.assert_allclose(boxes[0, :3], [[0, 0, 20, 20], [30, 30, 50, 50], [50, 50, 64, 64]])
    np.testing.assert_allclose(scores[0, :3], tf.sigmoid([4.0, 2.0, 1.0]), atol=1e-6)  # best first
    np.testing.assert_allclose(boxes[0, 3], 0.0)


def test_proposals_follow_their_deltas_and_the_pre_nms_cut():
    anchors = tf.constant([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    deltas = tf.constant([[[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # move box 0 right 5 px
    boxes, _, valid = proposals.propose(tf.constant([[2.0, 1.0]]), deltas, anchors, (40, 40),
                                        pre_nms=1, post_nms=2)
    assert valid.numpy().tolist() == [[True, False]]  # pre_nms=1: only the best anchor goes on
    np.testing.assert_allclose(boxes[0, 0], [5.0, 0.0, 15.0, 10.0], atol=1e-5)


def test_proposal_targets_add_the_true_boxes_and_label_by_iou():
    boxes = tf.constant([[[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]]])
    classes = tf.constant([[4, 0]])
    valid = tf.constant([[True, False]])
    props = tf.constant([[[11.0, 11.0, 31.0, 31.0],   # IoU 0.82: class 4 -> label 5
                          [20.0, 10.0, 40.0, 30.0],   # IoU 1/3: background
                          [0.0, 0.0, 0.0, 0.0]]])     # padding: never sampled
    out = targets.proposal_targets(props, tf.constant([[True, True, False]]), boxes, classes,
                                   valid, iou=0.5, size=8, positive_fraction=0.5, seed=3)
    weight = out["roi_weight"][0].numpy()
    assert weight.tolist() == [1, 1, 1] + [0] * 5  # two proposals and the true box; no more
    taken = out["rois"][0, :3].numpy().tolist()
    assert sorted(taken) == sorted([[11, 11, 31, 31], [20, 10, 40, 30], [10, 10, 30, 30]])
    for k, roi in enumerate(taken):
        label = int(out["labels"][0, k])
        assert label == (0 if roi == [20, 10, 40, 30] else 5)
        assert out["delta_weight"][0, k] == (label > 0)
        if roi == [10, 10, 30, 30]:
            np.testing.assert_allclose(out["deltas"][0, k], 0.0, atol=1e-6)
    # A stricter stage: the 0.82 proposal is background at IoU 0.85, the true box still not.
    strict = targets.proposal_targets(props, tf.constant([[True, True, False]]), boxes, classes,
                                      valid, iou=0.85, size=8, positive_fraction=0.5, seed=3)
    labels = {tuple(r): int(l) for r, l, w in zip(strict["rois"][0].numpy().tolist(),
                                                 strict["labels"][0].numpy(),
                                                 strict["roi_weight"][0].numpy()) if w}
    assert labels[(11.0, 11.0, 31.0, 31.0)] == 0 and labels[(10.0, 10.0, 30.0, 30.0)] == 5


# ------------------------------------------------------------------------------ heads


def test_rpn_head_outputs_line_up_with_keras_cv_anchors():
    """The head's flat outputs are listed (y, x, anchor) like AnchorGenerator's anchors: a
    feature map lit at one location lights exactly that location's anchors."""
    generator = kcv.load().layers.AnchorGenerator(
        bounding_box_format="xyxy", sizes=[16], scales=[1.0, 1.5], aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8])
    anchors = generator(image_shape=(48, 64, 3))[0].numpy()  # 6 x 8 locations, 6 anchors each
    head = heads.rpn_head(4, 6)
    features = np.zeros((1, 6, 8, 4), np.float32)
    features[0, 2, 5] = 1.0  # the location whose centre is (5.5 * 8, 2.5 * 8) = (44, 20)
    # Make the head pass its input through: conv = identity at the centre tap, objectness =
    # the sum of the channels for every anchor.
    head.get_layer("conv").set_weights([_centre_identity(4), np.zeros(4)])
    head.get_layer("objectness").set_weights([np.ones((1, 1, 4, 6)), np.zeros(6)])
    logits, deltas = head(features)
    assert logits.shape == (1, len(anchors)) and deltas.shape == (1, len(anchors), 4)
    lit = np.nonzero(logits[0].numpy() > 0)[0]
    centres = (anchors[lit, :2] + anchors[lit, 2:]) / 2
    assert len(lit) == 6 and np.allclose(centres, [44, 20])


def _centre_identity(channels):
    """A 3x3 kernel that passes each channel through at the centre tap only."""
    kernel = np.zeros((3, 3, channels, channels), np.float32)
    kernel[1, 1] = np.eye(channels)
    return kernel


def test_box_and_mask_heads_shapes():
    boxes = heads.box_head(7, 8, num_classes=6, hidden=32)
    logits, deltas = boxes(tf.zeros((5, 7, 7, 8)))
    assert logits.shape == (5, 7) and deltas.shape == (5, 4)
    masks = heads.mask_head(14, 8, num_classes=6, width=16)
    assert masks(tf.zeros((3, 14, 14, 8))).shape == (3, 28, 28, 6)


# ------------------------------------------------------------------------------ losses


def test_losses_average_over_what_their_weights_select():
    # Objectness: only the sampled anchors count; a confident right answer costs ~0.
    target, weight = tf.constant([[1.0, 0.0, 1.0]]), tf.constant([[1.0, 1.0, 0.0]])
    assert float(losses.objectness_loss(target, tf.constant([[20.0, -20.0, -20.0]]), weight)) < 1e-6
    np.testing.assert_allclose(losses.objectness_loss(target, tf.zeros((1, 3)), weight), np.log(2))
    # Smooth L1 worked by hand: |d| = 0.05 (quadratic) and 2 (linear) with beta 0.1.
    got = losses.smooth_l1(tf.zeros((1, 4)), tf.constant([[0.05, 2.0, 0.0, 0.0]]), 0.1)
    np.testing.assert_allclose(got, [0.5 * 0.05 ** 2 / 0.1 + (2.0 - 0.05)], rtol=1e-5)
    assert float(losses.delta_loss(tf.zeros((2, 4)), tf.ones((2, 4)), tf.zeros(2), 1.0)) == 0.0
    # Classification: mean over the sampled RoIs; background is class 0.
    logits = tf.constant([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        losses.classification_loss(tf.constant([0, 2]), logits, tf.constant([0.0, 1.0])),
        np.log(3), rtol=1e-6)


def test_mask_loss_reads_only_the_true_class_map():
    target = tf.ones((2, 4, 4))
    logits = np.full((2, 4, 4, 3), -30.0, np.float32)
    logits[0, ..., 1] = 30.0  # RoI 0, class 2 (label 2 -> map 1): right
    logits[1, ..., 0] = 30.0  # RoI 1 is background: whatever it predicts does not count
    loss = losses.mask_loss(target, tf.constant(logits), tf.constant([2, 0]), tf.constant([1.0, 0.0]))
    assert float(loss) < 1e-6
    wrong = losses.mask_loss(target, tf.constant(logits), tf.constant([3, 0]), tf.constant([1.0, 0.0]))
    np.testing.assert_allclose(wrong, 30.0, rtol=1e-4)


def _paste_reference(mask, box, height, width):
    """Each pixel centre read bilinearly from the map, cell centres at (i + 0.5) / m of the box,
    0 beyond the map (grid_sample with zero padding)."""
    m = mask.shape[0]
    x0, y0, x1, y1 = box
    padded = np.pad(mask, 1)
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            u = (y + 0.5 - y0) / (y1 - y0) * m - 0.5 + 1
            v = (x + 0.5 - x0) / (x1 - x0) * m - 0.5 + 1
            out[y, x] = _bilinear(padded[..., None], u, v)[0]
    return out


def test_paste_masks_puts_box_maps_back_into_the_image():
    rng = np.random.default_rng(3)
    maps = rng.uniform(size=(3, 6, 6)).astype(np.float32)
    boxes = np.array([[2, 3, 14, 9], [0, 0, 20, 12], [15.5, 7.25, 19.75, 11.5]], np.float32)
    got = roi.paste_masks(tf.constant(maps), tf.constant(boxes), 12, 20).numpy()
    assert got.shape == (3, 12, 20)
    for k in range(3):
        np.testing.assert_allclose(got[k], _paste_reference(maps[k], boxes[k], 12, 20), atol=1e-5)
    # A full map fills its box: 1 inside, 0.5 on its edge, under 0.5 (never kept) half a map
    # cell outside it, 0 beyond.
    full = roi.paste_masks(tf.ones([1, 4, 4]), tf.constant([[4.0, 2.0, 12.0, 10.0]]), 12, 16)[0]
    full = full.numpy()
    assert np.all(full[3:9, 5:11] > 0.99)
    outside = np.ones_like(full, bool)
    outside[2:10, 4:12] = False
    assert np.all(full[outside] < 0.5) and np.all(full[:, :3] == 0) and np.all(full[11:] == 0)
