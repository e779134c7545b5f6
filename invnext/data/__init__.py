"""Video data: index files, decoding, sampling, transforms, the bundled default dataset."""
