"""Aggregation strategies: FedAvg wrappers with update validation."""
