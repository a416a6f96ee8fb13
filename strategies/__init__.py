"""Aggregation strategies: a validating wrapper around Flower's FedAvg, FedProx and FedAdam."""
