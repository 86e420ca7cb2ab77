"""Model loading: prototxt and caffemodel through the user's own pycaffe."""
