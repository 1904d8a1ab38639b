"""Screening an archive on Ray (`osteoscreen screen`): every input once, resumable, ending in a referral list.

    sources.list_inputs ------------- a folder (recursive), or a CSV/Parquet manifest with a `path` column
      -> inspect.inspect       (task)  the DICOM header only (stop_before_pixels): id, patient, study, the
                                       intended-use header checks; excluded inputs are never decoded
      -> filter                        ids already in DIR/results (resume.done_ids) and dates outside the range
      -> prepare.prepare       (task)  read and decode to the model input; a bad file becomes a failed row
      -> actor.Screener        (actor) the bundle, loaded once per actor: extractor + forest + content check
      -> storeback.StoreBack   (actor) optional: the SR back to a PACS, with the node's deterministic UIDs
      -> write_parquet                 DIR/results/, the columns of `schema.SCHEMA`
    then thumbnails.Thumbnailer (actor) the explanation overlay of each flagged study's top image, the missing
                                       ones only, into DIR/thumbnails/
    and summary.json, referrals.csv and report.html from the whole results table (`worklist`).
The stages count their work in Ray's metrics (`metrics`), for Prometheus on a cluster.
"""
