"""Intended use: is this image what the model was trained and validated for (a lateral lumbar spine radiograph
like its training images)? DICOM header checks (`header`), a content check learned with the model (`content`),
and the operator's policy for what fails them, refuse or flag (`policy`)."""
