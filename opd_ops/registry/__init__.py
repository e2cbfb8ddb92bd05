"""S3 model registry: immutable numbered versions; a version is visible once its manifest exists."""
