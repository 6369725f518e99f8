"""Models: the built-in ones (one file each) and user models (an ONNX file or ``module:callable``)."""
