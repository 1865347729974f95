"""Training: turns a labelled dataset into a model folder the MedSeg engine loads."""
