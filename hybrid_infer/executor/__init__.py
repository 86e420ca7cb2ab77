"""Running a partitioned model: engines per segment, tensors handed between them."""
