"""Output and exchange formats: batch files, TFRecords, Lab records, CIFAR pickles, the mean image."""
