"""The DP statistics a hospital releases in the handshake, one module per release."""
