"""Bytes in, validated model input out: format sniffing, PNG/JPEG/DICOM decoding, the size limits checked
before any pixel is decoded, and the resize to the model's 224x224 grayscale tensor. Knows nothing of the
model or of serving, so training, local prediction and every protocol decode the same way."""
