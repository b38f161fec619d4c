"""The data side: materialise a source (``sources``, ``demo``), draw the sample, the test set
and the predict inputs, and split the sample (``sampling``)."""
