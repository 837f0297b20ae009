"""keras-cv backbones built from explicit sizes, never presets (a preset downloads).

Classifiers (`classifiers`) put a head on these; detectors (`detectors`) put a feature pyramid
and box heads on them. Sizes are those of the keras-cv presets of the same names, written out.
"""

from __future__ import annotations

# name -> (stackwise_channels, stackwise_depth), keras-cv's yolo_v8_{xs,s,m}_backbone presets.
YOLO_SIZES = {
    # Narrower than any keras-cv preset: half yolov8_xs' channels, one block per stage (1.0 M
    # parameters as a detector, 1.8x its training images/s at 64 px; the demo's detector).
    "yolov8_xxs": ([16, 32, 64, 128], [1, 1, 1, 1]),
    "yolov8_xs": ([32, 64, 128, 256], [1, 2, 2, 1]),
    "yolov8_s": ([64, 128, 256, 512], [1, 2, 2, 1]),
    "yolov8_m": ([96, 192, 384, 576], [2, 4, 4, 2]),
}


def yolo_backbone(name: str, input_shape: tuple):
    from tfkarpa import kcv
    keras_cv = kcv.load()

    channels, depth = YOLO_SIZES[name]
    return keras_cv.models.YOLOV8Backbone(stackwise_channels=channels, stackwise_depth=depth,
                                          include_rescaling=True, input_shape=input_shape)


def _kcv(make):
    def build(input_shape):
        from tfkarpa import kcv
        keras_cv = kcv.load()

        return make(keras_cv.models, input_shape)

    return build


# keras-cv backbones by classifier name. Detectors build on these too.
KCV_BACKBONES = {
    "kcv_resnet18": _kcv(lambda m, shape: m.ResNetBackbone(
        stackwise_filters=[64, 128, 256, 512], stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2], block_type="basic_block", include_rescaling=True,
        input_shape=shape)),
    "kcv_resnet50": _kcv(lambda m, shape: m.ResNetBackbone(
        stackwise_filters=[64, 128, 256, 512], stackwise_blocks=[3, 4, 6, 3],
        stackwise_strides=[1, 2, 2, 2], block_type="block", include_rescaling=True,
        input_shape=shape)),
    "kcv_csp_darknet_tiny": _kcv(lambda m, shape: m.CSPDarkNetBackbone(
        stackwise_channels=[48, 96, 192, 384], stackwise_depth=[1, 3, 3, 1],
        include_rescaling=True, input_shape=shape)),
    "kcv_efficientnet_lite_b0": _kcv(lambda m, shape: m.EfficientNetLiteBackbone(
        include_rescaling=True, width_coefficient=1.0, depth_coefficient=1.0,
        stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3], stackwise_num_repeats=[1, 2, 2, 3, 3, 4, 1],
        stackwise_input_filters=[32, 16, 24, 40, 80, 112, 192],
        stackwise_output_filters=[16, 24, 40, 80, 112, 192, 320],
        stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6], stackwise_strides=[1, 2, 2, 2, 1, 2, 1],
        input_shape=shape)),
    # YOLOv8 backbones (keras-cv's yolo_v8_{xs,s,m}_backbone sizes, and our xxs): classify or
    # pretrain one, then start a YOLOv8 detector from it with backbone=RUN.
    **{f"kcv_{name}": _kcv(lambda m, shape, name=name: yolo_backbone(name, shape))
       for name in YOLO_SIZES},
}
