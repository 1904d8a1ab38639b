"""DICOM results a PACS stores next to the study: an IHE AI Results (AIR) Comprehensive 3D SR (TID 1500)
built with highdicom from a prediction and its DICOM source image's header, and the explanation overlay as
a Secondary Capture; both carry one identity (`identity`). Pure functions of bytes and values:
no model, no server, so the CLI and every protocol build the same document."""
