"""Site validation: the registered model, unchanged, on a hospital's own labelled images (`evaluate`: metrics,
calibration and subgroup tables), and a traceable recalibrated version fitted on part of them (`recalibrate`:
new calibrator and threshold over the parent's extractor and forest, byte for byte)."""
