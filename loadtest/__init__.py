"""Load testing for OsteoScreen: the Locust file, its SLO gate and the `make loadtest` runner (see README.md)."""
