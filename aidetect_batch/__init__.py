"""aidetect-batch: a distributed batch scanner that tells real photographs from AI-generated images."""

__version__ = "0.1.0"
