"""Instance segmentation (`task=segment`): Mask R-CNN and Cascade Mask R-CNN on the detection
task's data, fit loop, evaluation and exports, with masks added at each step."""
