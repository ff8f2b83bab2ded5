"""dinolab: the whole DINOv2 system — backbones, self-supervised pretraining, data curation, evaluation."""

__version__ = "0.1.0"
