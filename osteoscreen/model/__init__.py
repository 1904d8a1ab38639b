"""What turns a 224x224 tensor into a probability: backbone specs, verified ImageNet weights, the grayscale
extractors, and the registered bundle (extractor + calibrated forest + threshold + model card). The only
package that imports TensorFlow; it never imports serving."""
