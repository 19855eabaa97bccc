"""File formats: Broden, images, target sets, tally.csv, activations, SVM, rankings, cache manifests."""
