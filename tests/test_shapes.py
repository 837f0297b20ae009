"""The procedural shapes data set: deterministic, balanced, boxes that fit the drawn shapes."""

import numpy as np

from tfkarpa.data import shapes


def test_same_seed_same_images_and_prefix_stable():
    a, la, ba, _ = shapes.generate(20, 24, seed=3)
    b, lb, bb, _ = shapes.generate(30, 24, seed=3)
    np.testing.assert_array_equal(a, b[:20])
    np.testing.assert_array_equal(la, lb[:20])
    c, _, _, _ = shapes.generate(20, 24, seed=4)
    assert not np.array_equal(a, c)


def test_classes_roughly_balanced():
    _, labels, _, _ = shapes.generate(600, 16, seed=0)
    counts = np.bincount(labels, minlength=len(shapes.CLASSES))
    assert counts.min() > 600 / len(shapes.CLASSES) * 0.7


def test_boxes_enclose_the_shape_and_stay_inside():
    size = 48
    for i in range(40):
        rng = np.random.default_rng([9, i])
        image, boxes, classes, mask = shapes.render_scene(rng, size, num_objects=1, with_mask=True)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        (x0, y0, x1, y1), = boxes
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        ys, xs = np.nonzero(mask > 0.5)
        # Pixel centres of the covered area lie inside the box, and the box is tight (1 px).
        assert xs.min() + 0.5 >= x0 - 0.5 and xs.max() + 0.5 <= x1 + 0.5
        assert ys.min() + 0.5 >= y0 - 0.5 and ys.max() + 0.5 <= y1 + 0.5
        assert xs.min() <= x0 + 1.5 and xs.max() + 1 >= x1 - 1.5
        assert classes[0] in range(len(shapes.CLASSES))


def test_multi_object_scenes_for_detection():
    images, _, boxes, classes = shapes.generate(10, 64, seed=1, num_objects=4)
    assert images.shape == (10, 64, 64, 3)
    for b, c in zip(boxes, classes):
        assert b.shape == (len(c), 4) and 1 <= len(c) <= 4
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])


def test_instance_masks_are_the_visible_part_of_each_object():
    plain = shapes.generate(12, 48, seed=5, num_objects=(2, 4), max_iou=0.5)
    masks = []
    images, _, boxes, classes = shapes.generate(12, 48, seed=5, num_objects=(2, 4), max_iou=0.5,
                                                masks=masks)
    np.testing.assert_array_equal(images, plain[0])  # the same draws, masks or not
    overlapped = hidden = 0
    for i, (scene, b, c) in enumerate(zip(masks, boxes, classes)):
        assert scene.shape == (len(c), 48, 48) and scene.dtype == bool
        assert scene.sum(0).max() <= 1  # visible parts do not overlap
        rng = np.random.default_rng([5, i])
        rng.integers(2, 5)  # as generate draws the scene's object count first
        _, _, _, coverage = shapes.render_scene(rng, 48, len(c), max_iou=0.5, with_mask=True)
        # Together they are the shapes' pixels; 1-pixel disagreements at shared edges only.
        assert np.mean(scene.any(0) != (coverage >= 0.5)) < 0.01
        for mask, (x0, y0, x1, y1) in zip(scene, b):
            ys, xs = np.nonzero(mask)
            if not len(xs):  # wholly covered by the shapes drawn after it
                hidden += 1
                continue
            assert xs.min() >= np.floor(x0) - 1 and xs.max() < np.ceil(x1) + 1
            assert ys.min() >= np.floor(y0) - 1 and ys.max() < np.ceil(y1) + 1
            whole = (x1 - x0) * (y1 - y0)
            overlapped += len(xs) < 0.3 * whole  # an object mostly hidden by later ones
    total = sum(len(c) for c in classes)
    assert overlapped < total and hidden < 0.1 * total
