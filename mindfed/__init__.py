"""MindFed: federated, differentially private synthetic mental-health cohorts."""

__version__ = "0.1.0"
