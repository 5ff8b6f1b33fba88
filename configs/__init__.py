"""Named config presets (TOML), shipped with the package."""
