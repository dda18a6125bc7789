"""The out-of-the-box demo: an embedded text-to-image dataset, its automatic score, and the run."""
