"""The Inception-ResNet-v2 embedding and its Keras backends."""
