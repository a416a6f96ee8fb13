"""TimeGAN for the daily weeks: sequence encoder, moments and their DP release, networks, losses, phases."""
