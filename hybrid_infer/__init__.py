"""hybrid_infer: run Caffe models with TensorRT where it can and Caffe where it cannot."""
