"""Private-PGM: a marginal-based DP generator estimated with `mbi` from summed noisy marginals."""
