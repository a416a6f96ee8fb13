"""Risk models: class probabilities of the schema's label from the profile and the week."""
