"""Training and evaluation: the seed's method (backbone features + Random Forest), made trustworthy:
grouped splits, cached features, cross-validated choices, calibrated probabilities, bootstrap intervals."""
