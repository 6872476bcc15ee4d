"""The trial's structured config: schema, checks, composition and the command-line overrides."""
