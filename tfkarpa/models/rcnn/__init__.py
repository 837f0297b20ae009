"""The two-stage (R-CNN) detector family: region proposals, RoI features, box and mask heads.

Built here on TensorFlow ops and keras-cv rather than on Model Garden's official/vision (issue 20's
measurement: tf-models-official 2.20 requires tensorflow~=2.20 and so cannot be pinned beside our
2.21; installed without its dependencies, a trained Mask R-CNN saves only from a checkpoint in a
fresh process, TF-MOT reaches 10 of its 43 convolutions, and a ResNet-18-FPN step at 128 px takes
7-13 s on a 2-core CPU). `roi`: the RoI feature crop every stage shares; `targets`: anchor and
proposal matching, sampling, box deltas and mask targets; `proposals`: a region proposal
network's output to boxes; `heads`: the RPN, box and mask heads; `losses`: theirs; `model`: the
detector (FPN, RPN, 1 or 3 box stages, optional mask head) with its training step.
"""
