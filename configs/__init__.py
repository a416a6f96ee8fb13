"""Configuration: TOML defaults and the typed pydantic models that load them."""
