"""What cloud and edge share: model zoo, datasets, the variant file format, wire helpers."""
