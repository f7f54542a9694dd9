"""The CIFAR training pipeline: config, data, models and run outputs used by ``train.py``."""
