"""OsteoScreen."""
