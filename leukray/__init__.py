"""leukray: train, evaluate and bulk-score leukemia (ALL) classifiers on blood smear images, on Ray."""

__version__ = "0.1.0"
