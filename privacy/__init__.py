"""Privacy: DP-SGD facade, accountant ledger, attacks and crypto."""
